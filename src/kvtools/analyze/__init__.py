"""Offline cache-hit analysis: replay a workload trace (Mooncake JSONL, request logs) through
a discrete-event cluster simulation under several routing policies, or summarise a recorded
KV-event capture. Pure computation except for the readers and the report writers."""
