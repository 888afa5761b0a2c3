"""CloudAPI GetImage served from a Postgres read model."""

__version__ = "0.1.0"
