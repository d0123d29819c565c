"""What the generator and the serving engine share: length buckets and per-row text with stops."""
