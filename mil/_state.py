"""Comparing a checkpoint with the module it is meant for."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def state_dict_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any]) -> str | None:
    """Describe how ``found`` tensors differ from ``expected`` (both name → tensor), or ``None``.

    Lists missing and unexpected names and shape mismatches (a few examples of each), which is
    what a user needs to see which model a checkpoint really belongs to.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if tuple(expected[k].shape) != tuple(found[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:5]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})")
    if shapes:
        parts.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:3])})")
    return "; ".join(parts) or None
