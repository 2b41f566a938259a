"""Stage download: data/raw written atomically for both sources; the resume cache lives outside it."""
from __future__ import annotations

import copy
import json

import pytest
import yaml

from pipeline.data import layout
from pipeline.stages import download as stage

from clevrer_server import FakeServer, expected_files, files_under


def write_params(root, tiny: dict, **data) -> None:
    raw = copy.deepcopy(tiny)
    raw["data"].update(data)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))


def test_clevrer_source(clevrer, tmp_path, monkeypatch, caplog, tiny_params_dict_fixture):
    caplog.set_level("INFO")
    srv = FakeServer(clevrer["archives"])
    try:
        write_params(tmp_path, tiny_params_dict_fixture, source="clevrer",
                     clevrer={"url": srv.url, "proposals": False})
        monkeypatch.chdir(tmp_path)
        stage.main()
    finally:
        srv.close()
    raw = tmp_path / "data" / "raw"
    want = expected_files(train=4, val=1, test=2)  # the tiny params' split sizes
    assert files_under(raw) == set(want) | {stage.REPORT_NAME}
    for rel, i in want.items():
        if rel.endswith(".mp4"):
            assert (raw / rel).read_bytes() == clevrer["videos"][i]
    report = json.loads((raw / stage.REPORT_NAME).read_text())
    assert report["source"] == "clevrer" and report["files"] == len(want)
    assert "bytes_downloaded" not in report and "seconds" not in json.dumps(report)  # run facts go to the log
    # the resume cache is next to the out, never in it (DVC deletes the out before running the stage)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".download_cache", "raw"]
    assert list((tmp_path / "data" / ".download_cache").rglob("video_00004.mp4"))
    out = caplog.text
    assert "download: clevrer: 7 videos" in out and "MiB downloaded" in out


def test_failed_download_leaves_previous_raw_untouched(clevrer, tmp_path, monkeypatch, tiny_params_dict_fixture):
    srv = FakeServer(clevrer["archives"])
    url = f"{srv.url}/moved"
    try:
        write_params(tmp_path, tiny_params_dict_fixture, source="clevrer", clevrer={"url": url, "proposals": False})
        (tmp_path / "data" / "raw").mkdir(parents=True)
        (tmp_path / "data" / "raw" / "old.txt").write_text("previous run")
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit, match=f"{url}/videos/train/video_train.zip: HTTP 404"):
            stage.main()
    finally:
        srv.close()
    assert files_under(tmp_path / "data" / "raw") == {"old.txt"}
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".raw")]


def test_synthetic_source(tmp_path, monkeypatch, tiny_params_dict_fixture):
    write_params(tmp_path, tiny_params_dict_fixture, source="synthetic")
    monkeypatch.chdir(tmp_path)
    stage.main()
    raw = tmp_path / "data" / "raw"
    for rel in expected_files(train=4, val=1, test=2):
        assert (raw / rel).is_file(), rel
    assert (raw / layout.gt_relpath("train", 0)).is_file()
    report = json.loads((raw / stage.REPORT_NAME).read_text())
    assert report["source"] == "synthetic"
    assert not (tmp_path / "data" / ".download_cache").exists()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]
