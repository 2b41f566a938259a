"""Markdown report of a change's effect on the pipeline: `dvc metrics diff` and `dvc params diff` vs a base.

    python -m pipeline.pr_report                        # workspace vs main, printed
    python -m pipeline.pr_report --base main --head my-branch --output pr.md
    python -m pipeline.pr_report --apply-tiny params.yaml  # CI: shrink a params.yaml to the tiny PR run

The same Markdown is posted on pull requests by .github/workflows/pr-metrics.yml, which runs the pipeline
with the tiny params on both the base and the head commit first. This module needs only the standard
library and PyYAML (CI also runs it against base commits that predate it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

EVAL_METRICS = "reports/metrics.json"
METHODS = ("model_ttt", "model", "flow_extrap", "copy_last", "vae_ceiling")
COLUMNS = (("psnr", "PSNR"), ("ssim", "SSIM"), ("lpips", "LPIPS"), ("psnr_step1", "PSNR 1-step"),
           ("ssim_step1", "SSIM 1-step"))

# Params of the PR metrics run: a few small synthetic videos, minutes on a CI runner's CPU.
TINY_PARAMS = {
    "device": "cpu",
    "data": {"videos": {"train": 8, "val": 2, "test": 4}, "frames": 12, "resolution": [32, 32], "workers": 2},
    "synthetic": {"width": 96, "height": 64, "frames": 12, "min_objects": 2, "max_objects": 4},
    "flow": {"backend": "dis", "batch": 8},
    "vae": {"hidden": 16, "latent_channels": 4, "steps": 150, "batch": 16, "kl_warmup": 50},
    "flow_vae": {"hidden": 8, "latent_channels": 2, "steps": 100, "batch": 16, "kl_warmup": 50},
    "model": {"hidden": 16, "context": 2},
    "train": {"steps": 150, "batch": 8, "rollout": 2},
    "ttt": {"steps": 5},
    "eval": {"context": 4, "horizon": 6, "figures": 2, "batch": 4},
}


def merge_known(base: dict, over: dict) -> tuple[dict, list[str]]:
    """`base` with `over` merged in, only for keys `base` already has; returns (merged, skipped keys)."""
    out, skipped = dict(base), []
    for key, value in over.items():
        if key not in base:
            skipped.append(key)
        elif isinstance(value, dict) and isinstance(base[key], dict):
            out[key], sub = merge_known(base[key], value)
            skipped += [f"{key}.{s}" for s in sub]
        else:
            out[key] = value
    return out, skipped


def apply_tiny(params_file: str | Path) -> list[str]:
    """Rewrite a params.yaml with TINY_PARAMS (keys it lacks are skipped, so old commits stay valid)."""
    path = Path(params_file)
    merged, skipped = merge_known(yaml.safe_load(path.read_text()), TINY_PARAMS)
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    return skipped


def _dvc(*args: str) -> str:
    """Run a dvc command and return stdout; a failure raises with dvc's own message."""
    proc = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _revs(base: str, head: str | None) -> list[str]:
    return [base] + ([head] if head else [])


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, (int, float)):
        return f"{x:.{digits}f}"
    return str(x)


def methods_table(diff: dict) -> str:
    """Markdown table of reports/metrics.json's methods (new value and change) from `dvc metrics diff --json --all`."""
    entries = diff.get(EVAL_METRICS, {})
    if not entries:
        return f"_{EVAL_METRICS} not found in either revision._\n"
    rows = ["| method | " + " | ".join(label for _, label in COLUMNS) + " |",
            "|---|" + "---|" * len(COLUMNS)]
    for m in METHODS:
        cells = []
        for key, _ in COLUMNS:
            e = entries.get(f"{m}.{key}", {})
            new, change = e.get("new"), e.get("diff")
            cell = _fmt(new)
            if isinstance(change, (int, float)) and change != 0:
                cell += f" ({change:+.4f})"
            cells.append(cell)
        if any(c != "–" for c in cells):
            rows.append(f"| {m} | " + " | ".join(cells) + " |")
    extras = []
    for key, label in (("collision.ap", "collision AP"), ("collision.f1", "collision F1"),
                       ("ttt_gain_psnr", "TTT gain (PSNR dB)"), ("arch", "arch")):
        e = entries.get(key)
        if e is not None:
            old, new = e.get("old"), e.get("new")
            extras.append(f"- {label}: {_fmt(new)}" + (f" (base {_fmt(old)})" if old != new else ""))
    for key in ("lpips_note", "ttt_note", "collision_note"):
        note = entries.get(key, {}).get("new")
        if note:
            extras.append(f"- {key.replace('_note', '')}: {note}")
    return "\n".join(rows + [""] + extras) + "\n"


def _table_or(md: str, empty: str) -> str:
    """`md` unless it is empty or a header-only table."""
    lines = [ln for ln in md.strip().splitlines() if ln.strip()]
    return md.strip() if len(lines) > 2 else empty


def build_report(base: str, head: str | None = None, *, title: str | None = None) -> str:
    """The Markdown: methods summary, then `dvc metrics diff --md` and `dvc params diff --md` (head vs base)."""
    revs = _revs(base, head)
    diff = json.loads(_dvc("metrics", "diff", *revs, "--all", "--json") or "{}")
    metrics_md = _table_or(_dvc("metrics", "diff", *revs, "--md"), "_No metric changed._")
    params_md = _table_or(_dvc("params", "diff", *revs, "--md"), "_No param changed._")
    head_name = head or "workspace"
    title = title or f"Pipeline metrics: `{head_name}` vs `{base}`"
    return "\n".join([
        f"## {title}", "",
        "Rollout metrics averaged over the prediction horizon (change vs base in parentheses).", "",
        methods_table(diff),
        "<details><summary><code>dvc metrics diff</code></summary>", "", metrics_md, "", "</details>", "",
        "### `dvc params diff`", "", params_md, "",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.pr_report", description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="main", help="git revision to compare against (default: main)")
    ap.add_argument("--head", default=None, help="git revision to report (default: the workspace)")
    ap.add_argument("--title", default=None, help="heading of the report")
    ap.add_argument("--output", default=None, help="write the Markdown here instead of stdout")
    ap.add_argument("--apply-tiny", metavar="PARAMS_YAML", default=None,
                    help="rewrite PARAMS_YAML with the tiny PR-run params and exit")
    args = ap.parse_args(argv)
    if args.apply_tiny:
        skipped = apply_tiny(args.apply_tiny)
        if skipped:
            print(f"pr_report: {args.apply_tiny} has no {', '.join(skipped)}; left out", file=sys.stderr)
        return 0
    try:
        text = build_report(args.base, args.head, title=args.title)
    except RuntimeError as e:
        print(f"pr_report: {e}", file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
