"""Benchmark of chat-api against python-socketio; see ``bench/run.py``."""
