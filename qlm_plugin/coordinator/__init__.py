"""The coordinator: gRPC control plane, HTTP front door, durable queue."""
