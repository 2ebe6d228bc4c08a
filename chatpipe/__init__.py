"""chatpipe: the shared core (settings, contract models, keys, clients, Redis state, CLI)."""

__version__ = "0.1.0"
