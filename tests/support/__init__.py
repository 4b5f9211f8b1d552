"""What the tests share: the real nats-server, the service, clusters, faults, forged requests.

Nothing here is a test; test modules import from here and never from each other.
"""
