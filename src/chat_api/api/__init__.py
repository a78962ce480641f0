"""HTTP surface of chat-api."""
