"""The local web dashboard: what the daemon is doing, each job's story with its before and after,
the failures with a Retry button, a Pause switch, and Prometheus metrics at /metrics."""
