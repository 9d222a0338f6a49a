"""tip_fed: secure federated data valuation with influence functions under CKKS encryption."""

__version__ = "0.1.0"
