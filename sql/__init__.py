"""SQL of the service: numbered migrations and the named queries, shipped as package data."""
