"""Data that must not be lost: the store for briefs and requests (SQLite by default, PostgreSQL by URL)."""
