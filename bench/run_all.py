"""Run every benchmark in bench/ and write bench/results/<name>.json plus bench/results/README.md (headline table).

Usage: python bench/run_all.py [--quick] [--only NAME[,NAME]] [--workspace DIR] [--set KEY=VALUE ...]
       python bench/run_all.py --table     # rewrite bench/results/README.md from the result files, run nothing

Benchmarks, in order (NAME: script -> result):
  render    bench_render.py    synthetic renderer ms/frame on the default data
  extract   bench_extract.py   extract frames/s vs a bare PyAV decode (target ratio >= 0.8)
  flow      bench_flow.py      pairs/s per flow backend, EPE vs the exact synthetic flow
  train     bench_train.py     training samples/s per temporal arch and per VAE
  infer     bench_infer.py     inference frames/s with and without test-time training
  wait_policy bench_wait_policy.py  train_temporal wall time, libgomp's default wait policy vs PASSIVE (ratio)
  temporal  bench_temporal.py  quality of the five archs on the test protocol, with intervals (needs a base run:
                               --temporal-data DIR with data/ and models/, default this repo after `dvc repro`)
  published bench_published.py published archs (SimVP, MVFN, ConvLSTM) trained from scratch on the base run's frames,
                               10 CPU minutes each, scored beside its model on val and test (same base as temporal)
  eval_kernels bench_eval_kernels.py  SSIM's matmul blur vs the float64 conv2d it replaced, the TTT step with the trunk
                               computed once vs every step (ratios; same base as temporal)
  pipeline  bench_pipeline.py  default `dvc repro` wall time and no-op `dvc repro` time (slow)
  memory    bench_memory.py    peak memory of extract and train_vae at 1x, 2x, 4x the default videos (slow)
--quick skips temporal, published, pipeline and memory and the CPU raft_large flow rows. render/extract/flow/train/infer/wait_policy
share one workspace (a project copy with the upstream stages run on the default data, see bench_train.py).
--set overrides params of that workspace and of the pipeline benchmark (for smoke runs only: the table
records them). A benchmark that fails is reported in the table and makes the exit status non-zero.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, machine  # noqa: E402

BENCH = REPO / "bench"
ORDER = ["render", "extract", "flow", "train", "infer", "wait_policy", "temporal", "published", "eval_kernels", "pipeline",
         "memory"]
SLOW = {"temporal", "published", "pipeline", "memory"}
TEMPORAL_FILES = ["data/frames.h5", "data/flow.h5", "data/latents.h5", "models/vae.pt", "models/flow_vae.pt"]


def commands(names: list[str], *, workspace: Path, quick: bool, overrides: list[str],
             temporal_data: Path | None, train_steps: int | None = None) -> dict[str, list[str] | str]:
    """Command line per benchmark, or a string saying why it is skipped."""
    sets = [a for item in overrides for a in ("--set", item)]
    ws_params = str(workspace / "params.yaml")
    cmds: dict[str, list[str] | str] = {
        "render": ["bench_render.py", "--params", ws_params, "--out", str(RESULTS / "render.json")],
        "extract": ["bench_extract.py", "--params", ws_params, "--raw", str(workspace / "data" / "raw")],
        "flow": ["bench_flow.py", "--params", ws_params, "--frames", str(workspace / "data" / "frames.h5"),
                 *(["--skip-raft-large"] if quick else [])],
        "train": ["bench_train.py", "--workspace", str(workspace), *sets,
                  *(["--steps", str(train_steps)] if train_steps else [])],
        "infer": ["bench_infer.py", "--workspace", str(workspace), *sets],
        "wait_policy": ["bench_wait_policy.py", "--base", str(workspace)],
        "temporal": (["bench_temporal.py", "--base", str(temporal_data)] if temporal_data is not None else
                     "no trained upstream outputs (run `dvc repro` first or pass --temporal-data DIR)"),
        "published": (["bench_published.py", "--base", str(temporal_data)] if temporal_data is not None else
                      "no trained upstream outputs (run `dvc repro` first or pass --temporal-data DIR)"),
        "eval_kernels": (["bench_eval_kernels.py", "--base", str(temporal_data)] if temporal_data is not None else
                         "no trained upstream outputs (run `dvc repro` first or pass --temporal-data DIR)"),
        "pipeline": ["bench_pipeline.py", *sets],
        "memory": ["bench_memory.py"],
    }
    return {n: cmds[n] for n in names}


def temporal_dir(arg: Path | None) -> Path | None:
    """The base run bench_temporal reads (data/ and models/ of a `dvc repro`), None when it is incomplete."""
    root = arg or REPO
    return root if all((root / rel).is_file() for rel in TEMPORAL_FILES) else None


def run(name: str, cmd: list[str], log: Path) -> dict:
    """Run one benchmark script, streaming its output to `log`; return status and wall time."""
    print(f"== {name}: python bench/{' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(REPO))
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, str(BENCH / cmd[0]), *cmd[1:]], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT, text=True)
    seconds = round(time.perf_counter() - start, 1)
    tail = log.read_text().splitlines()[-15:]
    print("\n".join(f"   {line}" for line in tail), flush=True)
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode}, see bench/results/logs/{log.name})"
    print(f"== {name}: {status} in {seconds} s", flush=True)
    return {"status": status, "seconds": seconds}


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(x, digits=1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def headline(name: str, r: dict) -> list[tuple[str, str]]:
    """(figure, value) rows of one result file."""
    if name == "render":
        d = r["dataset"]
        run = d["run"]  # the timings: render_dataset keeps them apart from what it writes
        return [("synthetic render", f"{1000 * run['seconds_per_frame']:.1f} ms/frame wall, "
                 f"{r['dataset_cpu_ms_per_frame']:.1f} CPU-ms/frame ({d['frames']} frames, {run['workers']} workers)")]
    if name == "extract":
        rows = [(f"extract ({r.get('source', 'synthetic')}) vs bare PyAV decode",
                 f"{r['extract_fps']:,.0f} vs {r['bare_decode_fps']:,.0f} frames/s: ratio {r['ratio']:.2f} "
                 f"(target >= {r['target']})")]
        if "frames_only_fps" in r:
            rows.append(("extract, frames only (as for real CLEVRER) vs bare PyAV decode",
                         f"{r['frames_only_fps']:,.0f} vs {r['bare_decode_fps']:,.0f} frames/s: ratio "
                         f"{r['frames_only_ratio']:.2f}"))
        return rows
    if name == "flow":
        return [(f"flow {row['backend']} ({row['device']})",
                 f"{row['pairs_per_s']:,.1f} pairs/s, EPE {row['epe'] if row['epe'] is not None else 'n/a'}")
                for row in r["rows"]]
    if name == "train":
        return [(f"train {row['model']} ({row['device']})",
                 f"{_fmt(row['samples_per_s'])} samples/s ({row['sample']}; batch {row['batch']}, "
                 f"{row['steps']} steps)") for row in r["rows"]]
    if name == "infer":
        rows = []
        for row in r["rows"]:
            ttt = (f"{_fmt(row['fps_model_ttt'])} frames/s with TTT ({row['ttt_steps']} steps, {row['ttt_params']})"
                   if row["ttt_supported"] else f"TTT n/a ({row['ttt_reason']})")
            rows.append((f"infer {row['arch']} ({row['device']})", f"{_fmt(row['fps_model'])} frames/s rollout; {ttt}"))
        return rows
    if name == "wait_policy":
        d, q, r_ = r["policies"]["default"], r["policies"]["PASSIVE"], r["passive_over_default_wall"]
        return [(f"{r['stage']} ({r['steps']} steps), OMP_WAIT_POLICY=PASSIVE vs unset",
                 f"{q['wall_s_median']} vs {d['wall_s_median']} s wall: ratio {r_['median']:.2f} "
                 f"(min {r_['min']:.2f}, max {r_['max']:.2f}, {r['pairs']} pairs)")]
    if name == "temporal":
        rows = []
        for row in r["rows"]:
            m, d = row["metrics"]["model"], row["metrics"]["model_minus_flow_extrap"]
            rows.append((f"quality {row['arch']} ({r['split']})",
                         f"{m['psnr']:.2f} dB [{m['psnr_lo']:.2f}, {m['psnr_hi']:.2f}], {d['psnr']:+.2f} dB "
                         f"[{d['psnr_lo']:+.2f}, {d['psnr_hi']:+.2f}] vs flow_extrap; trained in {row['train_seconds']} s"))
        return rows
    if name == "published":
        rows = []
        for arch, run in r["archs"].items():
            m, d = r["splits"]["test"]["methods"][arch]["psnr"], r["splits"]["test"]["model_minus"][arch]["psnr"]
            rows.append((f"published {arch} (test), {run['steps']} steps in {run['train_s']:.0f} s",
                         f"{m['mean']:.2f} dB [{m['lo']:.2f}, {m['hi']:.2f}]; model - {arch} {d['mean']:+.2f} dB "
                         f"[{d['lo']:+.2f}, {d['hi']:+.2f}]"))
        return rows
    if name == "eval_kernels":
        s_, t = r["ssim"], r["ttt"]
        rows = [(f"SSIM of {s_['shape']}, float64 conv2d / ours", f"{s_['conv2d_s']} / {s_['ours_s']} s: ratio "
                 f"{s_['ratio_conv2d_over_ours']:.2f} (max score diff {s_['max_abs_diff']})")]
        if "skipped" not in t:
            rows.append((f"TTT step ({t['ttt_params']}), ttt_loss / ttt_objective",
                         f"{t['ttt_loss_ms_per_step']} / {t['ttt_objective_ms_per_step']} ms: ratio "
                         f"{t['ratio_loss_over_objective']:.2f} (max loss diff {t['max_abs_loss_diff']})"))
        return rows
    if name == "pipeline":
        rows = [("`dvc repro`, default params", f"{r['repro_s'] / 60:.1f} min ({len(r['stages_run'])} stages)"),
                ("no-op `dvc repro`", f"{r['noop_repro_s']:.1f} s")]
        probe = r.get("speed_probe")  # results before bench/speed_probe.py have none
        if probe:
            rows.append(("`dvc repro` in default train_temporal steps (bench/speed_probe.py)",
                         f"{probe['repro_in_probe_steps']:,} steps; a step took {1000 * probe['before']['step_s']:.0f} ms "
                         f"before, {1000 * probe['after']['step_s']:.0f} ms after"))
        return rows
    if name == "memory":
        rows = [(f"peak memory, {row['scale']}x videos ({row['frames_h5_mb']:.0f} MB frames.h5)",
                 f"extract {row['extract_peak_mb']} MB, train_vae {row['train_vae_peak_mb']} MB") for row in r["rows"]]
        rows.append(("peak memory growth", f"data x{r['data_growth']}: extract x{r['extract_growth']}, "
                     f"train_vae x{r['train_vae_growth']} (flat = 1)"))
        return rows
    return []


def write_table(status: dict[str, dict], overrides: list[str]) -> Path:
    """bench/results/README.md: one row per headline figure of every result file present."""
    m = machine()
    lines = ["# Benchmark results", "",
             f"Written by `python bench/run_all.py` on {time.strftime('%Y-%m-%d %H:%M')} on {m['cpu_count']} CPUs "
             f"({m['processor']}, {m['cpu_capability']}), GPU: {m['gpu'] or 'none'}, torch {m['torch']}, "
             f"Python {m['python']}; load average {os.getloadavg()[0]:.1f} at the end (a shared machine makes "
             "wall times noisy). Each row was measured where its `machine` column says (a row whose file predates "
             "the CPU capability record shows none).", ""]
    if overrides:
        lines += [f"**Smoke run with param overrides {overrides}: not the default-data figures.**", ""]
    lines += ["| benchmark | figure | value | measured | machine |", "|---|---|---|---|---|"]
    for name in ORDER:
        r, st = _load(name), status.get(name)
        if st is not None and st["status"].startswith("failed"):
            lines.append(f"| {name} | - | {st['status']} | this run | |")
            continue
        if r is None:
            lines.append(f"| {name} | - | not measured{' (' + st['status'] + ')' if st else ''} | | |")
            continue
        where = r.get("machine") or {"cpu_count": r.get("cpus", "?")}  # bench_render writes `cpus` only
        box = (f"{where.get('cpu_count', '?')} CPU" + (f" {where['cpu_capability']}" if where.get("cpu_capability") else "")
               + (f", {where['gpu']}" if where.get("gpu") else ""))
        when = (r.get("measured_at") or "?").replace("T", " ")[:16]  # a file's mtime is its checkout's, not its run's
        try:
            rows = headline(name, r)
        except (KeyError, TypeError, ZeroDivisionError) as e:  # an older result file of another layout
            rows = [("-", f"unreadable result file ({type(e).__name__}: {e})")]
        for fig, value in rows:
            lines.append(f"| {name} | {fig} | {value} | {when} | {box} |")
    lines += ["", "Per-benchmark details (rows, settings, notes) are in the JSON file of the same name; logs of the "
              "last run in `logs/`."]
    path = RESULTS / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip temporal, published, pipeline, memory and CPU raft_large")
    parser.add_argument("--only", action="append", default=[], help=f"NAME[,NAME]: run only these ({', '.join(ORDER)})")
    parser.add_argument("--workspace", type=Path, default=None, help="reuse/create the shared workspace here")
    parser.add_argument("--temporal-data", type=Path, default=None,
                        help="base run for bench_temporal (a project dir after `dvc repro`: data/ and models/); "
                             "default: this repo")
    parser.add_argument("--set", action="append", default=[], help="param override KEY=VALUE (smoke runs)")
    parser.add_argument("--train-steps", type=int, default=None, help="steps per arch in bench_train (default 30)")
    parser.add_argument("--table", action="store_true", help="only rewrite the table from the result files present")
    args = parser.parse_args()
    if args.table:
        if args.only or args.quick or args.set:
            raise SystemExit("--table runs nothing: it takes no --only, --quick or --set")
        print(write_table({}, []).read_text())
        return
    only = [n for item in args.only for n in item.split(",") if n]
    unknown = sorted(set(only) - set(ORDER))
    if unknown:
        raise SystemExit(f"unknown benchmark {', '.join(unknown)}; valid: {', '.join(ORDER)}")
    names = [n for n in ORDER if (n in only if only else not (args.quick and n in SLOW))]
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    status: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_all_") as tmp:
        tmp = Path(tmp)
        workspace = args.workspace or tmp / "workspace"
        if {"render", "extract", "flow", "train", "infer"} & set(names):
            from bench.bench_train import prepare_workspace
            print(f"== workspace {workspace}", flush=True)
            prepare_workspace(workspace, overrides=args.set)
        cmds = commands(names, workspace=workspace, quick=args.quick, overrides=args.set,
                        temporal_data=temporal_dir(args.temporal_data) if "temporal" in names else None,
                        train_steps=args.train_steps)
        for name, cmd in cmds.items():
            if isinstance(cmd, str):
                status[name] = {"status": f"skipped: {cmd}", "seconds": 0}
                print(f"== {name}: skipped: {cmd}", flush=True)
                continue
            status[name] = run(name, cmd, RESULTS / "logs" / f"{name}.log")
    path = write_table(status, args.set)
    print(path.read_text())
    failed = [n for n, s in status.items() if s["status"].startswith("failed")]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
