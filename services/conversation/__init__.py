"""Conversation history: event-sourced from the compacted `conversation.turns` topic.

The prompt stage reads it to feed the whole past conversation to the model every turn; the
gateway reads it to answer GetConversation and to check who owns a conversation.
"""
