"""The allowed values of the settings that choose a kind of thing (a runtime, a disclosure, a projection,
a preconditioner), declared once.

A leaf module: it imports nothing, so the settings (:mod:`tip_fed.config`) and the code that
implements each kind (:mod:`tip_fed.core`, which imports nothing above itself) share one list.
"""

__all__ = ["DISCLOSURES", "PRECONDITIONER_KINDS", "PROJECTION_KINDS", "RUNTIMES"]

RUNTIMES = ("inprocess", "flower-simulation", "flower-deployment", "grpc")
DISCLOSURES = ("aggregate", "per-sample")
PROJECTION_KINDS = ("rademacher", "gaussian")
PRECONDITIONER_KINDS = ("identity", "raw", "kfac", "ekfac")
