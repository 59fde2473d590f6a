"""Params laid over params: the one rule by which an override reaches a params tree (a fleet adapter over
params.yaml, a benchmark's overrides over its committed params): a mapping merges key by key, any other value
replaces. Input and output: plain dicts (the input is not changed)."""

from __future__ import annotations

import copy


def merge(defaults: dict, overrides: dict) -> dict:
    """`defaults` with `overrides` laid over it: mappings merge key by key, any other value replaces."""
    out = copy.deepcopy(defaults)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
