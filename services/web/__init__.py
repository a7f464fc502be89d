"""The OpenAI-compatible HTTP front over the gateway's ChatService and ModerationService."""
