"""TLS and mutual TLS for the service's own connection, with certificates made in the test."""
