"""Tokenizer service: the model's BPE tokenizer and chat template, over gRPC and as a pipeline stage.

The stage counts the tokens of each new user message for the message-size metric, beside the
turn's path by default (or in front of input moderation: chat.requests -> chat.tokenized, see
worker.py); the gRPC API serves Tokenize/Detokenize/CountTokens and ApplyChatTemplate for direct use.
"""
