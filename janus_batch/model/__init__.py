"""Model layer: resolve a source to a local directory and list its weight files (sources.py), read its checkpoint
files (checkpoint.py), convert DeepSeek's original checkpoints (convert.py), and load Janus and its processor
(load.py); Janus' special tokens and prompt formats (tokens.py) and its understanding preprocessing
(preprocessing.py); random models for tests and benchmarks: tiny (tiny.py) and at the real dims (random_init.py).

Import each name from its module: this package imports none of them, so that sources.py, tokens.py and
preprocessing.py load without torch or transformers (a job's driver and its CPU workers use them).
"""
