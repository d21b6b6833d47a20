"""Durable desired state (sqlite3, WAL)."""
