"""Fault injection against real processes: the store gone, slow or cut off,
nats-server restarted, the service killed or stopped mid-burst, a flood of garbage, a loop of
bad clients, and replayed requests. Results are summed up in docs/reliability.md, "Faults"."""
