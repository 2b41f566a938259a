"""Markdown report of a change's effect on the pipeline: metrics with intervals, paired changes, `dvc` diffs vs a base.

    python -m pipeline.pr_report                        # workspace vs main, printed
    python -m pipeline.pr_report --base main --head my-branch --output pr.md
    python -m pipeline.pr_report --apply-tiny params.yaml  # CI: shrink a params.yaml to the `pr` profile

The same Markdown is posted on pull requests by .github/workflows/pr-metrics.yml, which runs the pipeline
with the tiny params on both the base and the head commit first. `--apply-tiny` needs only the standard
library and PyYAML (CI runs it from a copy against base commits that predate it); the report itself pairs
per-video scores with pipeline.stats.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

try:
    from pipeline.profiles import apply_profile
except ImportError:  # CI runs a copy of this file next to a copy of profiles.py, against old base commits
    from profiles import apply_profile  # type: ignore[no-redef]

EVAL_METRICS = "reports/metrics.json"
PER_VIDEO = "reports/evaluate/per_video.json"
COLUMNS = (("psnr", "PSNR"), ("ssim", "SSIM"), ("lpips", "LPIPS"), ("psnr_step1", "PSNR 1-step"),
           ("ssim_step1", "SSIM 1-step"))
LOWER_IS_BETTER = {"lpips"}

def apply_tiny(params_file: str | Path) -> list[str]:
    """Rewrite a params.yaml with the `pr` profile (keys it lacks are skipped, so old commits stay valid)."""
    path = Path(params_file)
    merged, skipped = apply_profile(yaml.safe_load(path.read_text()), "pr", strict=False)
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


def _interval(fields: dict, key: str, digits: int = 3) -> str:
    """'27.260 [26.91, 27.63]' from a metrics.json method object, '–' when missing."""
    value, lo, hi = fields.get(key), fields.get(f"{key}_lo"), fields.get(f"{key}_hi")
    if value is None:
        return "–"
    if lo is None or hi is None:
        return _fmt(value, digits)
    return f"{value:.{digits}f} [{lo:.{digits - 1}f}, {hi:.{digits - 1}f}]"


def _significant(fields: dict, key: str) -> bool:
    """True when the interval of a difference excludes zero."""
    lo, hi = fields.get(f"{key}_lo"), fields.get(f"{key}_hi")
    return lo is not None and hi is not None and (lo > 0 or hi < 0)


def _methods(metrics: dict) -> list[str]:
    """The method objects of a metrics.json (those with a psnr), in the file's order."""
    return [k for k, v in metrics.items() if isinstance(v, dict) and "psnr" in v and "_minus_" not in k]


def paired_change(head: dict | None, base: dict | None, method: str, key: str, *, resamples: int = 2000,
                  level: float = 0.95, seed: int = 0):
    """Interval of head - base of one method's per-video scores, paired over the same videos (None if unpaired)."""
    if not head or not base or head.get("video_index") != base.get("video_index"):
        return None
    a = head.get("scores", {}).get(method, {}).get(key)
    b = base.get("scores", {}).get(method, {}).get(key)
    if not a or not b or len(a) != len(b) or any(v is None for v in a + b):
        return None
    from pipeline.stats import paired_difference, resample_indices  # numpy: only where a report is built
    return paired_difference(a, b, resample_indices(len(a), resamples=resamples, seed=seed), level=level)


def methods_table(metrics: dict, base_metrics: dict | None = None, *, per_video: dict | None = None,
                  base_per_video: dict | None = None) -> str:
    """Markdown: each method's value [95% interval] and its change vs base.

    A change is marked significant (bold, with its interval) only when the paired bootstrap interval of
    head - base over the same videos excludes zero; otherwise it is shown as `n.s.` (or `unpaired` when
    the revisions do not share per-video scores of the same videos).
    """
    if not metrics:
        return f"_{EVAL_METRICS} not found._\n"
    base_metrics = base_metrics or {}
    rows = ["| method | " + " | ".join(label for _, label in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for m in _methods(metrics):
        cells = []
        for key, _ in COLUMNS:
            cell = _interval(metrics[m], key)
            old = base_metrics.get(m, {}).get(key) if isinstance(base_metrics.get(m), dict) else None
            new = metrics[m].get(key)
            if isinstance(old, (int, float)) and isinstance(new, (int, float)) and old != new:
                change = paired_change(per_video, base_per_video, m, key)
                if change is None:
                    cell += f" ({new - old:+.3f}, unpaired)"
                elif change.excludes_zero:
                    cell += f" (**{change.mean:+.3f}** [{change.lo:+.2f}, {change.hi:+.2f}])"
                else:
                    cell += f" ({change.mean:+.3f}, n.s.)"
            cells.append(cell)
        if any(c != "–" for c in cells):
            rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def differences_table(metrics: dict) -> str:
    """Markdown: the paired differences within this run (model - baselines, model_ttt - model) with intervals."""
    pairs = [k for k, v in metrics.items() if isinstance(v, dict) and "_minus_" in k]
    if not pairs:
        return ""
    rows = ["| difference | PSNR | SSIM | PSNR 1-step | significant (PSNR) |", "|---|---|---|---|---|"]
    for k in pairs:
        f = metrics[k]
        if f.get("psnr") is None:
            continue
        sig = "yes" if _significant(f, "psnr") else "no (interval includes 0)"
        rows.append(f"| {k.replace('_minus_', ' − ')} | {_interval(f, 'psnr')} | {_interval(f, 'ssim', 4)} | "
                    f"{_interval(f, 'psnr_step1')} | {sig} |")
    return "\n".join(rows) + "\n"


def notes(metrics: dict) -> str:
    """Split, arch, flow backend, collision scores and notes as a bullet list."""
    out = [f"- split: {metrics.get('split', '?')} ({metrics.get('videos', '?')} videos), arch: "
           f"{metrics.get('arch', '?')}, flow: {metrics.get('flow_backend', '?')}"]
    col = metrics.get("collision") or {}
    if col:
        out.append(f"- collision (every frame with history): AP {_fmt(col.get('ap'), 3)} vs constant "
                   f"{_fmt(col.get('ap_constant'), 3)}, best F1 {_fmt(col.get('best_f1'), 3)}, event recall "
                   f"(+-1 frame) {_fmt(col.get('event_recall'), 3)}")
    for key in ("lpips_note", "ttt_note", "collision_note"):
        if metrics.get(key):
            out.append(f"- {key.replace('_note', '')}: {metrics[key]}")
    return "\n".join(out) + "\n"


def _table_or(md: str, empty: str) -> str:
    """`md` unless it is empty or a header-only table."""
    lines = [ln for ln in md.strip().splitlines() if ln.strip()]
    return md.strip() if len(lines) > 2 else empty


def read_json_at(rev: str | None, path: str) -> dict | None:
    """A JSON file at a git revision (`git show REV:path`), or in the workspace when rev is None; None if absent."""
    if rev is None:
        p = Path(path)
        return json.loads(p.read_text()) if p.is_file() else None
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        return None


def build_report(base: str, head: str | None = None, *, title: str | None = None) -> str:
    """The Markdown: methods with intervals and paired changes, differences, then `dvc metrics/params diff`."""
    revs = _revs(base, head)
    metrics = read_json_at(head, EVAL_METRICS) or {}
    base_metrics = read_json_at(base, EVAL_METRICS) or {}
    table = methods_table(metrics, base_metrics, per_video=read_json_at(head, PER_VIDEO),
                          base_per_video=read_json_at(base, PER_VIDEO))
    metrics_md = _table_or(_dvc("metrics", "diff", *revs, "--md"), "_No metric changed._")
    params_md = _table_or(_dvc("params", "diff", *revs, "--md"), "_No param changed._")
    head_name = head or "workspace"
    title = title or f"Pipeline metrics: `{head_name}` vs `{base}`"
    return "\n".join([
        f"## {title}", "",
        "Each value is the mean over the evaluated videos with its 95% bootstrap interval; rollout metrics are "
        "averaged over the prediction horizon. A change vs base is **bold** only when the paired interval of "
        "head − base over the same videos excludes zero (n.s. otherwise).", "",
        table, differences_table(metrics), notes(metrics),
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
                    help="rewrite PARAMS_YAML with the `pr` profile of pipeline/profiles.yaml and exit")
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
