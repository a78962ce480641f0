"""The Redis backend: pub/sub between pods, room offsets and history in Redis."""
