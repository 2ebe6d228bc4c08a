"""The HTTP api: accepts chats and cancels, serves answers as SSE from Redis."""
