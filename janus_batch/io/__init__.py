"""Inputs, outputs and storage: schemas, readers, one writer per output format, S3 configuration."""
