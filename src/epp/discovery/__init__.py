"""Endpoint discovery from an InferencePool: pure reconciliation (`pool`) fed by a
Kubernetes watch (`kubernetes`) or, in tests, by any other event source."""
