"""Choose a default on the val split: run what a params change affects, score on val, tabulate.

    python bench/sweep.py -S ttt.steps=0,5,20 [-S ttt.lr=1e-4,3e-4] [--name ttt] [--base DIR]
    python bench/sweep.py -S vae.steps=1000,2000,3000 --name vae_steps
    python bench/sweep.py -S ttt.steps=5,20 --fix model.context=3 --base DIR   # DIR holds a trained temporal.pt

Every combination of the listed values (a grid) is run in its own temporary directory: the stages from the
first one its params reach (flow, train_vae, train_flow_vae, encode, train_temporal, infer, evaluate, control)
are called in-process with `eval.split=val`, reading what they do not re-run from the base run (the
workspace's last `dvc repro`: data/*.h5, models/*.pt; or --base DIR with the same layout). The test split
is never read: `--split test` is refused, because a default chosen by looking at test numbers makes the
test numbers optimistic. Writes bench/results/sweep_<name>.json with the split it read.
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from bench.common import REPO, parse_value, save  # noqa: E402

# stage -> (params sections it reads, the paths.* it writes); in DAG order after extract
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "flow": (("flow",), ("flow",)),
    "train_vae": (("vae",), ("vae",)),
    "train_flow_vae": (("flow_vae",), ("flow_vae",)),
    "encode": ((), ("latents",)),
    "train_temporal": (("model", "loss", "train"), ("temporal",)),
    "infer": (("ttt", "eval"), ("predictions",)),
    "evaluate": (("eval",), ()),
    "control": (("control", "eval"), ()),
}
DOWNSTREAM = {"flow": {"train_flow_vae", "encode", "train_temporal", "infer", "evaluate", "control"},
              "train_vae": {"encode", "train_temporal", "infer", "evaluate", "control"},
              "train_flow_vae": {"encode", "train_temporal", "infer", "evaluate", "control"},
              "encode": {"train_temporal", "infer", "evaluate", "control"},
              "train_temporal": {"infer", "evaluate", "control"}, "infer": {"evaluate"}, "evaluate": set(),
              "control": set()}
BASE_FILES = {"frames": "data/frames.h5", "flow": "data/flow.h5", "latents": "data/latents.h5",
              "vae": "models/vae.pt", "flow_vae": "models/flow_vae.pt", "temporal": "models/temporal.pt"}


def parse_grid(items: list[str]) -> dict[str, list]:
    """['a.b=1,2', 'c=x'] -> {'a.b': [1, 2], 'c': ['x']} (values parsed as YAML, 1e-3 as a number)."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"bad -S {item!r}: expected KEY=V1[,V2...]")
        grid[key] = [parse_value(v) for v in values.split(",")]
    return grid


def stages_to_run(keys: list[str]) -> list[str]:
    """The stages a change of these params keys re-runs, in DAG order."""
    run: set[str] = set()
    for key in keys:
        section = key.split(".")[0]
        if section in ("data", "synthetic", "paths"):
            raise SystemExit(f"{key}: sweeping the data itself is not supported here (it changes what val is)")
        if section == "device":
            run |= set(STAGES)
            continue
        hit = [s for s, (sections, _) in STAGES.items() if section in sections]
        if not hit:
            raise SystemExit(f"{key}: no stage reads params section {section!r}")
        for s in hit:
            run |= {s} | DOWNSTREAM[s]
    return [s for s in STAGES if s in run]


def set_key(raw: dict, key: str, value) -> None:
    """raw[a][b] = value for key 'a.b'; unknown keys are an error naming them."""
    node, *parents, leaf = [raw, *key.split(".")]
    for part in parents:
        if part not in node or not isinstance(node[part], dict):
            raise SystemExit(f"unknown param {key}")
        node = node[part]
    if leaf not in node:
        raise SystemExit(f"unknown param {key}")
    node[leaf] = value


def _stage_functions() -> dict[str, Callable]:
    from pipeline.control import control, write_control_figures
    from pipeline.evaluation import evaluate
    from pipeline.flow.compute import compute_flow
    from pipeline.inference import infer
    from pipeline.io import atomic_path, resolve_device, write_json
    from pipeline.temporal_training import train_temporal
    from pipeline.latents import encode_latents
    from pipeline.vae_training import train_flow_vae, train_vae

    def flow(p):
        with atomic_path(p.paths.flow) as tmp:
            compute_flow(p.paths.frames, tmp, flow=p.flow, device=resolve_device(p.device))

    def encode(p):
        encode_latents(p.paths.frames, p.paths.flow, p.paths.vae, p.paths.flow_vae, p.paths.latents, device=p.device)

    def control_stage(p):
        report, figures = control(p)
        write_control_figures(figures, p.paths.report_dir("control") / "figures", count=p.control.figures,
                              context=p.eval.context)
        write_json(p.paths.report_dir("control") / "metrics.json", report)

    return {"flow": flow, "train_vae": train_vae, "train_flow_vae": train_flow_vae, "encode": encode,
            "train_temporal": train_temporal, "infer": lambda p: infer(p, log=lambda s: None),
            "evaluate": lambda p: evaluate(p, log=lambda s: None), "control": control_stage}


def run_variant(raw: dict, overrides: dict, *, base: Path, work: Path, split: str,
                log: Callable[[str], None] = print) -> dict:
    """Run the stages `overrides` reach with params raw + overrides on `split`; return metrics.json's content.

    `raw` may already hold fixed overrides (--fix): they describe the base run and re-run nothing.
    """
    from pipeline.config import params_from_dict

    raw = json.loads(json.dumps(raw))
    for key, value in overrides.items():
        set_key(raw, key, value)
    raw["eval"]["split"] = split
    stages = stages_to_run(list(overrides) or ["eval.split"])
    written = {out for s in stages for out in STAGES[s][1]}
    for name, rel in BASE_FILES.items():
        raw["paths"][name] = str(work / Path(rel).name) if name in written else str(base / rel)
    raw["paths"]["predictions"] = str(work / "predictions.h5")
    raw["paths"]["reports"] = str(work / "reports")
    missing = [raw["paths"][n] for n in BASE_FILES if n not in written and not Path(raw["paths"][n]).is_file()]
    if missing:
        raise SystemExit(f"the base run lacks {missing}: run `dvc repro` first (or pass --base)")
    params = params_from_dict(raw)
    functions = _stage_functions()
    for stage in stages:
        t0 = time.perf_counter()
        functions[stage](params)
        log(f"  {stage}: {time.perf_counter() - t0:.0f} s")
    return json.loads((work / "reports" / "metrics.json").read_text())


HEADLINE = ("psnr", "psnr_lo", "psnr_hi", "ssim", "psnr_step1", "ssim_step1")


def headline(metrics: dict) -> dict:
    """The numbers a sweep table shows: every method's and difference's headline fields, the collision scores."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict) and "psnr" in value:
            out[key] = {k: value.get(k) for k in HEADLINE}
    collision = metrics.get("collision") or {}
    out["collision_ap"] = collision.get("ap")
    out["collision"] = {k: collision.get(k) for k in ("ap", "f1", "event_recall", "best_f1", "best_f1_threshold")}
    return out


def sweep(grid: dict[str, list], *, base: Path, split: str, params_file: Path = REPO / "params.yaml",
          fixed: dict | None = None, keep: Path | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run every combination of `grid` (key -> values) over params + `fixed`; return [{overrides, metrics}]."""
    if split == "test":
        raise SystemExit("sweeps choose defaults and must not read the test split: use --split val")
    raw = yaml.safe_load(params_file.read_text())
    for key, value in (fixed or {}).items():
        set_key(raw, key, value)
    keys = list(grid)
    results = []
    with tempfile.TemporaryDirectory(prefix="sweep_") as tmp:
        for i, values in enumerate(itertools.product(*(grid[k] for k in keys))):
            overrides = dict(zip(keys, values))
            work = Path(tmp) / f"run{i}"
            work.mkdir()
            log(f"{i + 1}: {overrides}")
            metrics = run_variant(raw, overrides, base=base, work=work, split=split, log=log)
            results.append({"overrides": overrides, "metrics": metrics})
            m = metrics["model"]
            log(f"  model {m['psnr']} dB [{m['psnr_lo']}, {m['psnr_hi']}], step1 {m['psnr_step1']}")
            if keep is not None:
                shutil.copytree(work / "reports", keep / f"run{i}", dirs_exist_ok=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set", action="append", default=[], required=True, help="KEY=V1[,V2...] (a grid)")
    ap.add_argument("--fix", action="append", default=[], help="KEY=VALUE the base run was made with (re-runs nothing)")
    ap.add_argument("--split", default="val", help="the split to score (only val is allowed)")
    ap.add_argument("--base", type=Path, default=REPO, help="directory holding the base run's data/ and models/")
    ap.add_argument("--name", default=None, help="results name: bench/results/sweep_<name>.json")
    args = ap.parse_args()
    if args.split != "val":
        raise SystemExit(f"--split {args.split}: sweeps choose defaults and read only the val split")
    grid = parse_grid(args.set)
    fixed = {k: v[0] for k, v in parse_grid(args.fix).items()}
    t0 = time.perf_counter()
    results = sweep(grid, base=args.base.resolve(), split=args.split, fixed=fixed)
    name = args.name or "_".join(k.replace(".", "-") for k in grid)
    path = save(f"sweep_{name}", {"split": args.split, "grid": grid, "fixed": fixed, "base": str(args.base),
                                  "seconds": round(time.perf_counter() - t0),
                                  "results": [{"overrides": r["overrides"], **headline(r["metrics"])}
                                              for r in results]})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
