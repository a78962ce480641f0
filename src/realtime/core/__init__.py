"""The pure core: no asyncio, no I/O (wire format, errors, connection state, hub,
sequencer, rate limit, access)."""
