"""Named params profiles (pipeline/profiles.yaml): params.yaml with a profile's overrides merged in.

Standard library and PyYAML only: the PR workflow runs `pipeline.pr_report --apply-tiny` from a copy next
to a copy of profiles.yaml, against base commits that may predate this module.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

__all__ = ["PROFILES_FILE", "profile", "merge", "apply_profile"]

PROFILES_FILE = Path(__file__).with_name("profiles.yaml")


def merge(base: dict, over: dict, *, strict: bool = True, where: str = "") -> tuple[dict, list[str]]:
    """`base` with `over` merged in; keys `base` lacks are refused (strict) or skipped and returned."""
    out, skipped = copy.deepcopy(base), []
    for key, value in over.items():
        name = f"{where}{key}"
        if key not in base:
            if strict:
                raise KeyError(f"profile key {name} is not in params.yaml")
            skipped.append(name)
        elif isinstance(value, dict) and isinstance(base[key], dict):
            out[key], sub = merge(base[key], value, strict=strict, where=f"{name}.")
            skipped += sub
        else:
            out[key] = copy.deepcopy(value)
    return out, skipped


def profile(name: str, *, path: str | Path = PROFILES_FILE) -> dict:
    """The overrides of profile `name`, with its `base:` profile (if any) merged under them."""
    profiles = yaml.safe_load(Path(path).read_text())
    if name not in profiles:
        raise KeyError(f"{path}: no profile {name!r}; profiles: {', '.join(profiles)}")
    over = dict(profiles[name])
    base = over.pop("base", None)
    if base is None:
        return over
    return _deep_merge(profile(base, path=path), over)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_profile(params: dict, name: str, *, strict: bool = True, path: str | Path = PROFILES_FILE
                  ) -> tuple[dict, list[str]]:
    """params (a params.yaml mapping) with profile `name` applied; returns (merged, skipped keys)."""
    return merge(params, profile(name, path=path), strict=strict)
