"""Request handlers that are not the WebSocket itself."""
