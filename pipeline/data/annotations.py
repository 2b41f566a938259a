"""CLEVRER annotation JSON: load, validate against CLEVRER's schema, read collision frames.

One reader for both sources (real CLEVRER and the synthetic renderer). Every problem raises
`AnnotationError` naming the file and what is wrong (CLEVRER's own annotation 10800 is broken).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["AnnotationError", "load_annotation", "validate_annotation", "collision_frames",
           "COLORS", "MATERIALS", "SHAPES"]

COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
MATERIALS = ("rubber", "metal")
SHAPES = ("sphere", "cube", "cylinder")
VECTOR_KEYS = ("location", "orientation", "velocity", "angular_velocity")


class AnnotationError(ValueError):
    """A missing, unreadable or malformed annotation file: names the file and the problem."""


def load_annotation(path: str | Path) -> dict:
    """Read and validate one CLEVRER annotation JSON file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AnnotationError(f"{path}: annotation file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: cannot read annotation ({type(e).__name__}: {e})") from None
    if not text.strip():
        raise AnnotationError(f"{path}: annotation file is empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON ({e})") from None
    validate_annotation(obj, str(path))
    return obj


def validate_annotation(obj: Any, where: str) -> None:
    """Check CLEVRER's schema; raise AnnotationError('<where>: <json path>: <problem>') on the first violation."""
    def fail(at: str, why: str) -> None:
        raise AnnotationError(f"{where}: {at}: {why}")

    def need(mapping: dict, key: str, types: type | tuple, at: str) -> Any:
        if key not in mapping:
            fail(at, f"missing key {key!r}")
        value = mapping[key]
        if not _is(value, types):
            fail(key if at == "top level" else f"{at}.{key}",
                 f"expected {_names(types)}, got {type(value).__name__} {_short(value)}")
        return value

    if not isinstance(obj, dict):
        fail("top level", f"expected a JSON object, got {type(obj).__name__}")
    need(obj, "scene_index", int, "top level")
    need(obj, "video_filename", str, "top level")
    props = need(obj, "object_property", list, "top level")
    ids: set[int] = set()
    for n, prop in enumerate(props):
        at = f"object_property[{n}]"
        if not isinstance(prop, dict):
            fail(at, f"expected an object, got {type(prop).__name__}")
        oid = need(prop, "object_id", int, at)
        if oid in ids:
            fail(at, f"duplicate object_id {oid}")
        ids.add(oid)
        for key, vocab in (("color", COLORS), ("material", MATERIALS), ("shape", SHAPES)):
            value = need(prop, key, str, at)
            if value not in vocab:
                fail(f"{at}.{key}", f"unknown value {value!r}; valid: {', '.join(vocab)}")
    traj = need(obj, "motion_trajectory", list, "top level")
    if not traj:
        fail("motion_trajectory", "is empty")
    for n, frame in enumerate(traj):
        at = f"motion_trajectory[{n}]"
        if not isinstance(frame, dict):
            fail(at, f"expected an object, got {type(frame).__name__}")
        if need(frame, "frame_id", int, at) < 0:
            fail(f"{at}.frame_id", f"must be >= 0, got {frame['frame_id']}")
        for m, entry in enumerate(need(frame, "objects", list, at)):
            eat = f"{at}.objects[{m}]"
            if not isinstance(entry, dict):
                fail(eat, f"expected an object, got {type(entry).__name__}")
            oid = need(entry, "object_id", int, eat)
            if oid not in ids:
                fail(f"{eat}.object_id", f"{oid} is not in object_property (ids {sorted(ids)})")
            for key in VECTOR_KEYS:
                _vector(need(entry, key, list, eat), f"{eat}.{key}", fail)
            need(entry, "inside_camera_view", bool, eat)
    for n, event in enumerate(need(obj, "collision", list, "top level")):
        at = f"collision[{n}]"
        if not isinstance(event, dict):
            fail(at, f"expected an object, got {type(event).__name__}")
        pair = need(event, "object_ids", list, at)
        if len(pair) != 2 or not all(_is(i, int) for i in pair):
            fail(f"{at}.object_ids", f"expected two integer object ids, got {_short(pair)}")
        unknown = [i for i in pair if i not in ids]
        if unknown:
            fail(f"{at}.object_ids", f"{unknown} not in object_property (ids {sorted(ids)})")
        if need(event, "frame_id", int, at) < 0:
            fail(f"{at}.frame_id", f"must be >= 0, got {event['frame_id']}")
        _vector(need(event, "location", list, at), f"{at}.location", fail)


def collision_frames(ann: dict) -> list[int]:
    """Sorted distinct frame ids at which a collision starts."""
    return sorted({int(event["frame_id"]) for event in ann.get("collision", [])})


def _vector(value: list, at: str, fail) -> None:
    if len(value) != 3 or not all(_is(v, (int, float)) for v in value):
        fail(at, f"expected 3 numbers, got {_short(value)}")


def _is(value: Any, types: type | tuple) -> bool:
    """isinstance that never takes a JSON true/false for a number."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _names(types: type | tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list", dict: "an object"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in types)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (set, tuple)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
