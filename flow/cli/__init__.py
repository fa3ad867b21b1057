"""The `flow` command line."""
