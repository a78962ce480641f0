"""Transports: adapters from a web server to the framework-free core."""
