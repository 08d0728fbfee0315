"""Halting policies: `make(name, **params)`, `available()`, `register`.

Built in: `fixed`, `convergence`, `entropy`. See `base.py` for the protocol.
"""

from . import convergence, entropy, fixed  # noqa: F401  (registers the built-ins)
from .base import SIGNALS, HaltingPolicy, Signals, available, make, policy_class, register

__all__ = ["SIGNALS", "HaltingPolicy", "Signals", "available", "make", "policy_class",
           "register"]
