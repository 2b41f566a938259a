"""bench/run_all.py's table: one row per result file, each with where and when it was measured."""
import json

import pytest

from bench import run_all


def test_table_rows_say_where_and_when_each_file_was_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    wait = {"measured_at": "2026-12-02T02:44:10", "stage": "train_temporal", "steps": 40, "pairs": 3,
            "machine": {"cpu_count": 2, "cpu_capability": "AVX2", "gpu": None},
            "policies": {"default": {"wall_s_median": 24.4}, "PASSIVE": {"wall_s_median": 34.0}},
            "passive_over_default_wall": {"median": 1.34, "min": 1.27, "max": 1.58}}
    (tmp_path / "wait_policy.json").write_text(json.dumps(wait))
    pipeline = {"repro_s": 660.0, "noop_repro_s": 5.3, "stages_run": ["a", "b"]}  # no measured_at, no machine
    (tmp_path / "pipeline.json").write_text(json.dumps(pipeline))
    text = run_all.write_table({}, []).read_text()
    assert (tmp_path / "README.md").is_file()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| benchmark")]
    wait_row = next(r for r in rows if r.startswith("| wait_policy"))
    assert "34.0 vs 24.4 s wall: ratio 1.34" in wait_row and "| 2026-12-02 02:44 | 2 CPU AVX2 |" in wait_row
    pipe_rows = [r for r in rows if r.startswith("| pipeline")]
    assert len(pipe_rows) == 2 and all(r.endswith("| ? | ? CPU |") for r in pipe_rows)
    assert any(r.startswith("| render | - | not measured") for r in rows)


def test_pipeline_rows_show_the_speed_probe_when_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    probe = {"before": {"step_s": 0.547}, "after": {"step_s": 0.612}, "repro_in_probe_steps": 1742}
    pipeline = {"repro_s": 1009.8, "noop_repro_s": 9.9, "stages_run": ["a"], "speed_probe": probe}
    (tmp_path / "pipeline.json").write_text(json.dumps(pipeline))
    rows = [line for line in run_all.write_table({}, []).read_text().splitlines() if line.startswith("| pipeline")]
    assert len(rows) == 3 and "1,742 steps; a step took 547 ms before, 612 ms after" in rows[2]


def test_table_rows_of_the_published_archs(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    iv = {"mean": 27.5, "lo": 26.9, "hi": 28.1}
    published = {"archs": {"simvp": {"steps": 1200, "train_s": 598.7}},
                 "splits": {"test": {"methods": {"simvp": {"psnr": iv}},
                                     "model_minus": {"simvp": {"psnr": {"mean": 3.6, "lo": 3.1, "hi": 4.2}}}}}}
    (tmp_path / "published.json").write_text(json.dumps(published))
    rows = [line for line in run_all.write_table({}, []).read_text().splitlines() if line.startswith("| published")]
    assert rows == ["| published | published simvp (test), 1200 steps in 599 s | 27.50 dB [26.90, 28.10]; "
                    "model - simvp +3.60 dB [+3.10, +4.20] | ? | ? CPU |"]


def test_table_only_takes_no_run_options(monkeypatch):
    monkeypatch.setattr("sys.argv", ["run_all.py", "--table", "--only", "render"])
    with pytest.raises(SystemExit, match="runs nothing"):
        run_all.main()
