"""Evaluation pictures: per-step metric curves (PNG) and per-video strips and GIFs of predictions."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.io import atomic_path, open_h5  # noqa: E402

__all__ = ["plot_curves", "strip_image", "write_figures", "side_by_side_gif", "labelled_strip"]

LABELS = {"psnr": "PSNR (dB, higher is better)", "ssim": "SSIM (higher is better)",
          "lpips": "LPIPS (lower is better)"}


def plot_curves(details: dict, plots_dir: str | Path, metrics=("psnr", "ssim", "lpips")) -> list[Path]:
    """reports/plots/<metric>.png: one line per method over the prediction steps (rollout)."""
    plots_dir = Path(plots_dir)
    written = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        drawn = 0
        for method, curves in details["per_step"].items():
            values = curves.get(metric)
            if values:
                steps = np.arange(1, len(values) + 1)
                line, = ax.plot(steps, _nan(values), marker="o", ms=3, label=method)
                if curves.get(f"{metric}_lo") and curves.get(f"{metric}_hi"):
                    ax.fill_between(steps, _nan(curves[f"{metric}_lo"]), _nan(curves[f"{metric}_hi"]),
                                    color=line.get_color(), alpha=0.15, linewidth=0)
                drawn += 1
        ax.set_xlabel("prediction step")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(LABELS.get(metric, metric))
        if drawn:
            ax.legend(fontsize=8)
            level = details.get("interval", {}).get("level")
            band = f", {level:.0%} intervals" if level else ""
            ax.set_title(f"{metric} per rollout step ({details.get('videos', '?')} {details.get('split', '')} videos"
                         f"{band})", fontsize=9)
        else:
            note = details.get(f"{metric}_note") or "not computed"
            ax.text(0.5, 0.5, f"{metric} not available:\n{_wrap(note)}", ha="center", va="center",
                    fontsize=8, transform=ax.transAxes)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = plots_dir / f"{metric}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        written.append(path)
    return written


def _nan(values) -> list[float]:
    return [np.nan if v is None else v for v in values]


def _wrap(text: str, width: int = 60) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join(lines + [line])


def strip_image(context: np.ndarray, truth: np.ndarray, preds: dict[str, np.ndarray], *, gap: int = 2) -> np.ndarray:
    """Grid uint8 image: row 'truth' = context | true future; one row per method (blank under the context);
    last row = |error| of the first method, amplified x4 (labelled 'error x4'). context [C,H,W,3], truth and preds [Hz,H,W,3]."""
    C, H, W, _ = context.shape
    Hz = truth.shape[0]
    cols = C + Hz
    first = next(iter(preds.values()))
    error = np.abs(first.astype(np.int16) - truth.astype(np.int16)).mean(-1)  # [Hz,H,W]
    error_rgb = np.clip(error * 4, 0, 255).astype(np.uint8)[..., None].repeat(3, -1)
    rows = [np.concatenate([context, truth])]
    blank = np.full((C, H, W, 3), 255, np.uint8)
    rows += [np.concatenate([blank, p]) for p in preds.values()]
    rows.append(np.concatenate([blank, error_rgb]))
    grid = np.full((len(rows) * (H + gap) - gap, cols * (W + gap) + gap * 2 - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c in range(cols):
            x = c * (W + gap) + (2 * gap if c >= C else 0)  # a wider gap after the context
            grid[r * (H + gap):r * (H + gap) + H, x:x + W] = row[c]
    return grid


def write_figures(pred_h5: str | Path, frames_h5: str | Path, out_dir: str | Path, *, count: int,
                  methods: list[str]) -> list[Path]:
    """reports/figures/video_<id>.png (strip) and .gif (truth | methods side by side) for `count` test videos."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    with atomic_path(out_dir) as tmp, open_h5(pred_h5, what="predictions") as p, open_h5(frames_h5) as fr:
        tmp.mkdir(parents=True)
        C, Hz, split = int(p.attrs["context"]), int(p.attrs["horizon"]), str(p.attrs["split"])
        methods = [m for m in methods if m in json.loads(p.attrs["methods"])]
        ids = p["video_index"][:]
        for i in range(min(count, len(ids))):
            video = fr[split]["video"][i, :C + Hz]  # [C+Hz,H,W,3]
            preds = {m: p[m]["rollout"][i] for m in methods}  # each [Hz,H,W,3]
            name = f"video_{int(ids[i]):05d}"
            grid = strip_image(video[:C], video[C:], preds)
            fig_h = grid.shape[0] / 40 + 0.6
            fig, ax = plt.subplots(figsize=(grid.shape[1] / 40 + 1.4, fig_h), dpi=100)
            ax.imshow(grid, interpolation="nearest")
            H = video.shape[1]
            row_names = ["truth"] + methods + ["error x4"]
            ax.set_yticks([r * (H + 2) + H / 2 for r in range(len(row_names))], row_names, fontsize=7)
            ax.set_xticks([])
            ax.set_title(f"{name}: {C} context frames | {Hz} predicted (rollout)", fontsize=8)
            fig.tight_layout()
            fig.savefig(tmp / f"{name}.png", format="png")
            plt.close(fig)
            written.append(out_dir / f"{name}.png")
            _write_gif(tmp / f"{name}.gif", video, preds, C)
            written.append(out_dir / f"{name}.gif")
    return written


def _write_gif(path: Path, video: np.ndarray, preds: dict[str, np.ndarray], context: int, scale: int = 2) -> None:
    """Side-by-side animation truth | method... (predictions follow the true context)."""
    panels = [video] + [np.concatenate([video[:context], p]) for p in preds.values()]
    side_by_side_gif(path, panels, context=context, scale=scale)


def side_by_side_gif(path: Path, panels: list[np.ndarray], *, context: int, scale: int = 2) -> None:
    """Animation of videos side by side (each uint8 [T,H,W,3]); a green border on context frames, red after."""
    frames = []
    for t in range(panels[0].shape[0]):
        color = (40, 180, 40) if t < context else (200, 40, 40)
        tiles = [np.pad(p[t], ((2, 2), (2, 2), (0, 0)), constant_values=0) for p in panels]
        for x in tiles:
            x[:2], x[-2:], x[:, :2], x[:, -2:] = color, color, color, color
        frames.append(Image.fromarray(np.concatenate(tiles, axis=1).repeat(scale, 0).repeat(scale, 1)))
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)


def labelled_strip(rows: dict[str, np.ndarray], path: Path, *, context: int, title: str, gap: int = 2) -> None:
    """PNG of one labelled row per video (uint8 [T,H,W,3] each), a wider gap after the first `context` frames."""
    T, H, W, _ = next(iter(rows.values())).shape
    grid = np.full((len(rows) * (H + gap) - gap, T * (W + gap) + gap, 3), 255, np.uint8)
    for r, row in enumerate(rows.values()):
        for c in range(T):
            x = c * (W + gap) + (2 * gap if c >= context else 0)
            grid[r * (H + gap):r * (H + gap) + H, x:x + W] = row[c]
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 40 + 1.8, grid.shape[0] / 40 + 0.6), dpi=100)
    ax.imshow(grid, interpolation="nearest")
    ax.set_yticks([r * (H + gap) + H / 2 for r in range(len(rows))], list(rows), fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
