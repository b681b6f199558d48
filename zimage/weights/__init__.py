"""Finding, checking, loading and fetching model weights (and building the tiny test model)."""
