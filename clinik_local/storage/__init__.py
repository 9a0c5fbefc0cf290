"""Storage: everything that touches SQLite (connections, schema, task and outbox rows)."""
