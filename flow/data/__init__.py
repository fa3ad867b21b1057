"""Corpus, tokenizer and token streams for training and evaluating families."""
