"""The AI consumer group over chat.requests: streams answers chunk by chunk."""
