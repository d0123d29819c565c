"""Native kernels that XLA cannot express well; each falls back to XLA where it cannot run."""
