"""`callout users import / import-sqlite / export` (issue 7, "Migration from SQLite and files")."""
