"""Ways to split one batch over several computers of it, above the model: threads and
worker processes on one host (split, workers, serve)."""
