"""Training the family with megatron-core (issue 3; not built yet)."""
