"""Pretext-task methods: rotation (and, as they land, colorization, relative position, multitask)."""

from selfsup.pretext.rotation import Rotation, rotate_batch

__all__ = ["Rotation", "rotate_batch"]
