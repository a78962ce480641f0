"""Examples of embedding ``realtime`` in other applications."""
