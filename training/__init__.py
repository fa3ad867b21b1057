"""Training the family with megatron-core: tensor x pipeline x data parallelism, exit losses on any
pipeline stage, distributed checkpoints and conversion into a family artifact."""
