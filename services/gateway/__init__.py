"""The gateway: ChatService, the public entry point. Holds each client's stream and relays the
pipeline's replies for it from this replica's own reply topic."""
