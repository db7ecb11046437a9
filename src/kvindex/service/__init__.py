"""The kvindex sidecar service: ingest, the index, and the HTTP and gRPC edges around the
index and the scorer."""
