"""Text layer: tokenizer, special tokens, incremental detokenizer, stop strings, chat format."""
