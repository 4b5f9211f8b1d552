"""Operator (decentralized) mode against a real nats-server: accounts as JWTs, `--creds`."""
