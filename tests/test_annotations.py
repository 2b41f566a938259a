"""CLEVRER annotation loader: schema validation and clear errors naming the file."""
from __future__ import annotations

import copy
import json

import pytest

from pipeline.data.annotations import AnnotationError, collision_frames, load_annotation, validate_annotation


def _obj(oid, x=0.0):
    return {"object_id": oid, "location": [x, 0.5, 0.2], "orientation": [0.0, 0.0, 0.1],
            "velocity": [1.0, 0.0, 0.0], "angular_velocity": [0, 0, 0], "inside_camera_view": True}


def _valid() -> dict:
    return {"scene_index": 10003, "video_filename": "video_10003.mp4",
            "object_property": [{"object_id": 0, "color": "red", "material": "metal", "shape": "cube"},
                                {"object_id": 1, "color": "cyan", "material": "rubber", "shape": "sphere"}],
            "motion_trajectory": [{"frame_id": t, "objects": [_obj(0, t * 0.1), _obj(1)]} for t in range(4)],
            "collision": [{"object_ids": [0, 1], "frame_id": 3, "location": [0.1, 0.5, 0.2]},
                          {"object_ids": [1, 0], "frame_id": 1, "location": [0.0, 0.5, 0.2]},
                          {"object_ids": [0, 1], "frame_id": 3, "location": [0.1, 0.5, 0.2]}]}


def _write(tmp_path, obj, name="annotation_10003.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_valid_annotation_loads(tmp_path):
    ann = load_annotation(_write(tmp_path, _valid()))
    assert ann == _valid()
    assert collision_frames(ann) == [1, 3]
    assert collision_frames({"collision": []}) == []


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "annotation_00042.json"
    with pytest.raises(AnnotationError, match=r"annotation_00042\.json: annotation file not found"):
        load_annotation(path)


def test_broken_json_names_the_file(tmp_path):
    """Like CLEVRER's own annotation 10800: the file exists but is not valid JSON."""
    text = json.dumps(_valid())
    path = _write(tmp_path, text[: len(text) // 2], "annotation_10800.json")
    with pytest.raises(AnnotationError, match=r"annotation_10800\.json: not valid JSON"):
        load_annotation(path)
    with pytest.raises(AnnotationError, match="empty"):
        load_annotation(_write(tmp_path, "  \n", "annotation_10801.json"))
    assert issubclass(AnnotationError, ValueError)


def _mutations():
    def drop(*keys):
        def f(a):
            node = a
            for k in keys[:-1]:
                node = node[k]
            del node[keys[-1]]
        return f

    def put(value, *keys):
        def f(a):
            node = a
            for k in keys[:-1]:
                node = node[k]
            node[keys[-1]] = value
        return f

    return [
        (drop("collision"), "missing key 'collision'"),
        (drop("scene_index"), "missing key 'scene_index'"),
        (drop("object_property", 0, "shape"), r"object_property\[0\]: missing key 'shape'"),
        (drop("motion_trajectory", 2, "objects", 1, "inside_camera_view"),
         r"motion_trajectory\[2\]\.objects\[1\]: missing key 'inside_camera_view'"),
        (drop("motion_trajectory", 0, "frame_id"), r"motion_trajectory\[0\]: missing key 'frame_id'"),
        (put("7", "scene_index"), r"scene_index: expected an integer, got str"),
        (put(True, "scene_index"), r"scene_index: expected an integer, got bool"),
        (put("0,0,0", "motion_trajectory", 1, "objects", 0, "location"),
         r"motion_trajectory\[1\]\.objects\[0\]\.location: expected a list"),
        (put([0.0, 1.0], "motion_trajectory", 1, "objects", 0, "velocity"), r"velocity: expected 3 numbers"),
        (put([0.0, None, 1.0], "motion_trajectory", 1, "objects", 0, "orientation"), "orientation: expected 3 numbers"),
        (put(1, "motion_trajectory", 0, "objects", 0, "inside_camera_view"), "inside_camera_view: expected true/false"),
        (put(9, "motion_trajectory", 0, "objects", 0, "object_id"), "9 is not in object_property"),
        (put("magenta", "object_property", 0, "color"), "unknown value 'magenta'"),
        (put("plastic", "object_property", 1, "material"), "unknown value 'plastic'"),
        (put("cone", "object_property", 1, "shape"), "unknown value 'cone'"),
        (put(0, "object_property", 1, "object_id"), "duplicate object_id 0"),
        (put([0, 1, 1], "collision", 0, "object_ids"), r"collision\[0\]\.object_ids: expected two integer"),
        (put([0, 5], "collision", 1, "object_ids"), r"\[5\] not in object_property"),
        (put(-1, "collision", 0, "frame_id"), "must be >= 0"),
        (put([], "motion_trajectory"), "motion_trajectory: is empty"),
        (put({}, "object_property"), "object_property: expected a list, got dict"),
        (put([1, 2], "motion_trajectory", 0, "objects", 0), r"objects\[0\]: expected an object"),
    ]


@pytest.mark.parametrize("mutate,message", _mutations())
def test_schema_violations_name_the_file_and_the_place(tmp_path, mutate, message):
    bad = copy.deepcopy(_valid())
    mutate(bad)
    path = _write(tmp_path, bad)
    with pytest.raises(AnnotationError, match=message) as err:
        load_annotation(path)
    assert str(err.value).startswith(f"{path}: ")


def test_top_level_must_be_an_object(tmp_path):
    with pytest.raises(AnnotationError, match="expected a JSON object, got list"):
        load_annotation(_write(tmp_path, "[1, 2]"))


def test_validate_in_memory_names_where():
    validate_annotation(_valid(), "mem")
    bad = _valid()
    bad["collision"] = "none"
    with pytest.raises(AnnotationError, match="^somewhere: collision: expected a list"):
        validate_annotation(bad, "somewhere")
