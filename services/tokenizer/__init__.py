"""Tokenizer service: the model's BPE tokenizer and chat template, over gRPC and as a pipeline stage.

The stage counts the tokens of each new user message (chat.requests -> chat.tokenized) so later
stages and metrics know its size; the gRPC API serves Tokenize/Detokenize/CountTokens and
ApplyChatTemplate for direct use.
"""
