"""bench/bench_render.py on tiny params: it renders, times the phases and writes its result file; run_all reads it."""
import json
import sys

import yaml

from bench import bench_render, run_all
from helpers import override, tiny_params_dict


def test_render_benchmark_writes_its_timings_and_run_all_reads_them(tmp_path, monkeypatch):
    params = override(tiny_params_dict(), {"data": {"videos": {"train": 2, "val": 1, "test": 1}, "workers": 1}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "render.json"
    monkeypatch.setattr(sys, "argv", ["bench_render.py", "--params", str(tmp_path / "params.yaml"), "--out", str(out)])
    bench_render.main()
    result = json.loads(out.read_text())
    run = result["dataset"]["run"]
    assert result["dataset"]["frames"] == 4 * params["synthetic"]["frames"] and run["workers"] == 1
    assert run["seconds_per_frame"] > 0 and result["dataset_cpu_ms_per_frame"] > 0
    assert result["one_video"]["render_s"] > 0
    (figure, value), = run_all.headline("render", result)
    assert figure == "synthetic render" and value.endswith(f"({4 * params['synthetic']['frames']} frames, 1 workers)")
