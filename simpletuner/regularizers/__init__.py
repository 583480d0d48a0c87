"""Regularizers: extra loss terms computed from what forward hooks capture inside the denoiser (one
file per regularizer; the contract is in base.py, the names in registry.py)."""
