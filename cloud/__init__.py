"""The cloud tier: gRPC continuation service over batched engine workers (issue 5; not built yet)."""
