"""Evaluation: the online probe callback (and, as they land, cached features, probes, kNN, sweeps)."""

from selfsup.eval.online import FrozenEncoder, OnlineLinearProbe

__all__ = ["FrozenEncoder", "OnlineLinearProbe"]
