"""twinstore: an event-sourced digital-twin backend speaking Eclipse Ditto's HTTP API v2."""

__version__ = "0.1.0"
