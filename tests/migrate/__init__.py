"""`callout users import / import-sqlite / export` (migration from SQLite and files)."""
