"""sodm: certified L2 robustness by randomized smoothing, trained with SODM and its baselines."""

__version__ = "0.1.0"
