"""Halting policies: `make(name, **params)`, `available()`, `register`.

Built in: `fixed`, `convergence`, `entropy`, `kl`, `acceleration`, `stability`, `learned`,
`schedule`, `random` (a control). See `base.py` for the protocol.
"""

from . import (  # noqa: F401  (registers the built-ins)
    acceleration,
    convergence,
    entropy,
    fixed,
    kl,
    learned,
    random_halting,
    schedule,
    stability,
)
from .base import (
    SIGNALS,
    HaltingPolicy,
    Signals,
    available,
    broken_plugins,
    make,
    policy_class,
    register,
)

__all__ = ["SIGNALS", "HaltingPolicy", "Signals", "available", "broken_plugins", "make",
           "policy_class", "register"]
