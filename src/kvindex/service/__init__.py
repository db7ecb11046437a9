"""The kvindex sidecar service: HTTP and gRPC edges over the index and the scorer."""
