"""The kvindex service: ingest, index and the HTTP (and gRPC) surface around them."""
