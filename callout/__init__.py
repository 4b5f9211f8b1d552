"""callout: a NATS auth-callout service that admits nkey clients listed in a JetStream KV bucket."""

__version__ = "0.1.0"
