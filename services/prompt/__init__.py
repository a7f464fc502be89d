"""Prompt service: hidden instructions + the whole past conversation + the new message, in budget.

The prompt stage (chat.moderated -> chat.prompts) assigns each turn its index, refuses blocked
messages with a recorded polite answer, and assembles the prompt the model sees; PromptService
exposes the same assembly for direct use.
"""
