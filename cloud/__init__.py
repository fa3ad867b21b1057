"""The cloud tier: the `flow.v1.Tier` gRPC service over a batched engine (in process or in ZeroMQ
worker processes), and its edge variant that forwards to the next tier."""
