"""dmuh: Deep Momentum Uncertainty Hashing and the baselines it is measured against."""

__version__ = "0.1.0"
