"""Janus' special tokens, as its tokenizer names them (DeepSeek's tokenizer.json and transformers' JanusProcessor):
the converter names them in DeepSeek's tokenizer, the engine builds prompts with them, the tiny model trains them."""

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE = "<image_placeholder>"
BOI = "<begin_of_image>"
EOI = "<end_of_image>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IMAGE, BOI, EOI)
