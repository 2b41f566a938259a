"""The flow stage's work: forward/backward flow and soft occlusion for every consecutive frame pair.

`compute_flow` streams frames.h5 one batch of pairs at a time (bounded memory), writes flow.h5
(DESIGN §4) and returns the stage report: backend used, throughput and, where the data carries
the exact flow (synthetic), quality on the test split.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from pipeline.config import Flow, params_hash, to_dict
from pipeline.io import open_h5
from pipeline.losses import epe_map
from pipeline.metrics import confusion_scores
from pipeline.flow.backends import BackendInfo, FlowBackend, FlowBackendError, PairBatch, build_backend
from pipeline.flow.ops import occlusion, warp
from pipeline.sharding import Shard, write_rows

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
EVAL_SPLIT = "test"
OUTLIER_PX = 3.0  # KITTI-style outlier: EPE > 3 px and > 5% of the true magnitude
OUTLIER_REL = 0.05


class FlowInputError(ValueError):
    """frames.h5 is missing, malformed, or lacks what the backend needs."""


@dataclass
class QualityAccumulator:
    """Streaming flow / occlusion quality against exact flow and visibility (one split)."""
    alpha1: float
    alpha2: float
    pixels: int = 0
    visible: int = 0
    epe_bwd: float = 0.0
    epe_bwd_visible: float = 0.0
    epe_fwd: float = 0.0
    outliers_bwd: int = 0
    occ: dict = field(default_factory=lambda: {"tp": 0, "fp": 0, "fn": 0})  # backend's hard mask
    occ_gt_flow: dict = field(default_factory=lambda: {"tp": 0, "fp": 0, "fn": 0})  # exact flow's check

    def update(self, fwd: Tensor, bwd: Tensor, hard: Tensor, gt_fwd: Tensor, gt_bwd: Tensor, gt_vis: Tensor) -> None:
        """fwd/bwd/gt_* [B,2,H,W], hard [B,1,H,W] (1 = visible), gt_vis [B,H,W] bool."""
        epe_b = epe_map(bwd, gt_bwd)  # [B,H,W]
        epe_f = epe_map(fwd, gt_fwd)
        mag = gt_bwd.norm(dim=1)
        self.pixels += epe_b.numel()
        self.visible += int(gt_vis.sum())
        self.epe_bwd += float(epe_b.sum(dtype=torch.float64))
        self.epe_bwd_visible += float(epe_b[gt_vis].sum(dtype=torch.float64))
        self.epe_fwd += float(epe_f.sum(dtype=torch.float64))
        self.outliers_bwd += int(((epe_b > OUTLIER_PX) & (epe_b > OUTLIER_REL * mag)).sum())
        _count(self.occ, hard[:, 0] < 0.5, ~gt_vis)
        _, gt_hard = occlusion(gt_bwd, gt_fwd, alpha1=self.alpha1, alpha2=self.alpha2)
        _count(self.occ_gt_flow, gt_hard[:, 0] < 0.5, ~gt_vis)

    def merge(self, other: "QualityAccumulator") -> None:
        """Add another shard's counts and sums."""
        for f in ("pixels", "visible", "epe_bwd", "epe_bwd_visible", "epe_fwd", "outliers_bwd"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        for name in ("occ", "occ_gt_flow"):
            for k in ("tp", "fp", "fn"):
                getattr(self, name)[k] += getattr(other, name)[k]

    def result(self) -> dict:
        n, v = max(self.pixels, 1), max(self.visible, 1)
        return {
            "pairs_pixels": self.pixels,
            "epe": self.epe_bwd / n,
            "epe_visible": self.epe_bwd_visible / v if self.visible else None,
            "epe_fwd": self.epe_fwd / n,
            "outlier_rate": self.outliers_bwd / n,
            "occlusion": _scores(self.occ),
            "occlusion_from_exact_flow": _scores(self.occ_gt_flow),
            "gt_occluded_fraction": 1.0 - self.visible / n,
        }


def _count(acc: dict, pred: Tensor, true: Tensor) -> None:
    acc["tp"] += int((pred & true).sum())
    acc["fp"] += int((pred & ~true).sum())
    acc["fn"] += int((~pred & true).sum())


def _scores(c: dict) -> dict:
    return {**confusion_scores(tp=c["tp"], fp=c["fp"], fn=c["fn"]), **c}


def _splits(frames: h5py.File, path: Path) -> list[str]:
    names = [s for s in SPLITS if s in frames]
    if not names:
        raise FlowInputError(f"{path}: no split group (expected some of {', '.join(SPLITS)}); found {list(frames)}")
    for s in names:
        g = frames[s]
        if "video" not in g:
            raise FlowInputError(f"{path}: split '{s}' has no 'video' dataset")
        v = g["video"]
        if v.ndim != 5 or v.shape[-1] != 3 or v.dtype != np.uint8:
            raise FlowInputError(f"{path}: {s}/video must be uint8 [N,T,H,W,3], got {v.dtype} {v.shape}")
        if v.shape[1] < 2:
            raise FlowInputError(f"{path}: {s}/video has {v.shape[1]} frames a video; flow needs >= 2")
        if _has_gt(g):
            N, T, H, W, _ = v.shape
            for name, shape in (("gt_fwd", (N, T - 1, 2, H, W)), ("gt_bwd", (N, T - 1, 2, H, W)),
                                ("gt_vis", (N, T - 1, H, W))):
                if name in g and g[name].shape != shape:
                    raise FlowInputError(f"{path}: {s}/{name} must be {list(shape)}, got {list(g[name].shape)}")
    return names


def _has_gt(group: h5py.Group) -> bool:
    return "gt_fwd" in group and "gt_bwd" in group


def _pair_runs(N: int, P: int, batch: int):
    """Yield lists of (row, t0, t1) runs covering `batch` consecutive pairs of the flattened [N, P] grid."""
    total = N * P
    for k0 in range(0, total, batch):
        k1 = min(k0 + batch, total)
        runs, k = [], k0
        while k < k1:
            n, t0 = divmod(k, P)
            t1 = min(P, t0 + (k1 - k))
            runs.append((n, t0, t1))
            k += t1 - t0
        yield runs


def _read_batch(group: h5py.Group, runs, with_gt: bool) -> tuple[PairBatch, np.ndarray | None]:
    """The pairs of `runs` ((video, t0, t1), global video indices) and their exact visibility if any."""
    clips, gf, gb, gv = [], [], [], []
    for n, t0, t1 in runs:
        clips.append(group["video"][n, t0:t1 + 1])  # [L+1,H,W,3]
        if with_gt:
            gf.append(group["gt_fwd"][n, t0:t1])
            gb.append(group["gt_bwd"][n, t0:t1])
            if "gt_vis" in group:
                gv.append(group["gt_vis"][n, t0:t1])
    cat = np.concatenate
    gt = dict(gt_fwd=cat(gf), gt_bwd=cat(gb)) if with_gt else {}
    return PairBatch.from_clips(clips, **gt), (cat(gv) if gv else None)


def compute_flow(frames_path: str | Path, out_path: str | Path, *, flow: Flow, device: torch.device,
                 backend: tuple[FlowBackend, BackendInfo] | None = None, figure_pairs: int = 4,
                 shard: Shard = Shard()) -> dict:
    """Write flow.h5 at `out_path` (a path the caller makes atomic) from frames.h5; return the report.

    The report has `backend_info`, `pairs`, `run` (seconds, pairs/s: for the log), per-split `visible_fraction`,
    `quality` on the test split when frames.h5 carries exact flow (else None), and `examples`
    (arrays for the figure: frames, flows, masks of the middle pair of the first `figure_pairs` test videos).
    With a `shard` of several, only its videos are computed and written (with their global rows, see
    pipeline.sharding); `merge_flow_reports` combines the shards' reports.
    """
    frames_path, out_path = Path(frames_path), Path(out_path)
    device = torch.device(device)
    with open_h5(frames_path, what="frames file") as frames:
        splits = _splits(frames, frames_path)
        backend_, info = backend if backend is not None else build_backend(flow, device)
        if info.backend_used == "gt":
            missing = [s for s in splits if not _has_gt(frames[s])]
            if missing:
                raise FlowBackendError(f"{frames_path}: backend gt needs exact flow, but split(s) {missing} have no "
                                       f"gt_fwd/gt_bwd (only data.source=synthetic provides them)")
        report = {"backend_info": info.as_dict(), "splits": {}, "quality": None, "examples": None}
        total_pairs, t_start = 0, time.perf_counter()
        with h5py.File(out_path, "w") as out:
            out.attrs["backend"] = info.backend
            out.attrs["backend_used"] = info.backend_used
            out.attrs["fallback_reason"] = info.fallback_reason or ""
            out.attrs["device"] = info.device
            out.attrs["num_updates"] = -1 if info.num_updates is None else info.num_updates
            out.attrs["occ_alpha1"], out.attrs["occ_alpha2"] = flow.occ_alpha1, flow.occ_alpha2
            out.attrs["params_hash"] = params_hash(flow)
            out.attrs["frames_params_hash"] = str(frames.attrs.get("params_hash", ""))
            for split in splits:
                group = frames[split]
                N_all, T, H, W, _ = group["video"].shape
                P = T - 1
                rows = shard.videos(N_all)  # global video index of each output row
                N = len(rows)
                og = out.create_group(split)
                write_rows(og, shard, rows)
                chunk = dict(chunks=(1, 1, 2, H, W)) if N else {}
                d_fwd = og.create_dataset("fwd", shape=(N, P, 2, H, W), dtype=np.float16, **chunk)
                d_bwd = og.create_dataset("bwd", shape=(N, P, 2, H, W), dtype=np.float16, **chunk)
                d_occ = og.create_dataset("occ", shape=(N, P, H, W), dtype=np.uint8,
                                          **(dict(chunks=(1, 1, H, W)) if N else {}))
                with_gt = _has_gt(group) and (info.backend_used == "gt" or split == EVAL_SPLIT)
                acc = (QualityAccumulator(flow.occ_alpha1, flow.occ_alpha2)
                       if split == EVAL_SPLIT and with_gt and "gt_vis" in group else None)
                vis_sum, examples = 0.0, []
                for runs in _pair_runs(N, P, flow.batch):
                    pairs, gt_vis = _read_batch(group, [(rows[n], t0, t1) for n, t0, t1 in runs], with_gt)
                    # [B,2,H,W] each, rounded to the float16 flow.h5 stores: the occlusion, the report and the
                    # figures are functions of the stored flow (a multithreaded backend's last float32 bits vary)
                    fwd, bwd = (f.to(torch.float16).float() for f in backend_(pairs))
                    soft, hard = occlusion(bwd, fwd, alpha1=flow.occ_alpha1, alpha2=flow.occ_alpha2)  # [B,1,H,W]
                    fwd16 = fwd.to(torch.float16).cpu().numpy()
                    bwd16 = bwd.to(torch.float16).cpu().numpy()
                    occ8 = soft[:, 0].mul(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()  # [B,H,W]
                    k = 0
                    for n, t0, t1 in runs:
                        d_fwd[n, t0:t1] = fwd16[k:k + t1 - t0]
                        d_bwd[n, t0:t1] = bwd16[k:k + t1 - t0]
                        d_occ[n, t0:t1] = occ8[k:k + t1 - t0]
                        k += t1 - t0
                    vis_sum += float(soft.sum(dtype=torch.float64))
                    if acc is not None:
                        gf = torch.from_numpy(pairs.gt_fwd.astype(np.float32)).to(device)
                        gb = torch.from_numpy(pairs.gt_bwd.astype(np.float32)).to(device)
                        gv = torch.from_numpy(gt_vis >= 128).to(device)
                        acc.update(fwd.to(device), bwd.to(device), hard.to(device), gf, gb, gv)
                    if split == EVAL_SPLIT:
                        ids = [(rows[n], t) for n, t in _pair_ids(runs)]  # (global video, t) of each pair
                        idx = [i for i, (n, t) in enumerate(ids) if n < figure_pairs and t == P // 2]  # mid pairs
                        if idx:
                            examples.append({"video": np.array([ids[i][0] for i in idx]),
                                             **_examples(pairs, fwd, bwd, soft, gt_vis, idx)})
                    total_pairs += len(pairs)
                report["splits"][split] = {"videos": N, "pairs": N * P, "visible_sum": vis_sum, "pixels": N * P * H * W,
                                           "visible_fraction": vis_sum / max(N * P * H * W, 1)}
                if acc is not None:
                    report["quality"] = {"split": split, **acc.result()}
                    report["accumulator"] = acc
                if examples:
                    report["examples"] = {k: np.concatenate([e[k] for e in examples]) for k in examples[0]}
                log.info("flow: %s done (%d pairs)", split, N * P)
        seconds = time.perf_counter() - t_start
    report.update(pairs=total_pairs,
                  run={"seconds": seconds, "pairs_per_s": total_pairs / max(seconds, 1e-9),
                       "torch_threads": torch.get_num_threads(), "ranks": shard.world})
    return report


ADVECT_STEPS = 10  # frames each advect_psnr prediction covers
ADVECT_EVERY = 5   # advect_psnr starts a prediction every this many frames


@torch.no_grad()
def photometric_quality(frames_h5: str | Path, flow_h5: str | Path, *, splits=("val", "test"),
                        chunk: int = 16) -> dict:
    """How well a flow.h5 predicts frames, per split: the measure of target quality that predicts prediction quality.

    warp_psnr: frame t+1 against frame t warped by bwd_t (every pair). advect_psnr: frames t+1..t+10
    against pipeline.baselines.flow_advection from frame t and bwd_{t-1} (constant motion carried with the
    content), starting every ADVECT_EVERY frames. Needs no exact flow, so real data gets it too.
    """
    from pipeline.baselines import flow_advection
    from pipeline.metrics import psnr

    out = {}
    with open_h5(frames_h5, what="frames file") as fr, open_h5(flow_h5, what="flow file") as fl:
        for split in splits:
            if split not in fr or split not in fl or fr[split]["video"].shape[0] == 0:
                continue
            N, T = fr[split]["video"].shape[:2]
            warp_sum, advect_sum, warp_n, advect_n = 0.0, 0.0, 0, 0
            for s in range(0, N, chunk):
                video = torch.from_numpy(fr[split]["video"][s:s + chunk]).permute(0, 1, 4, 2, 3).float() / 255
                bwd = torch.from_numpy(fl[split]["bwd"][s:s + chunk].astype(np.float32))  # [b,T-1,2,H,W]
                scores = psnr(warp(video[:, :-1], bwd), video[:, 1:])
                warp_sum, warp_n = warp_sum + float(scores.sum()), warp_n + scores.numel()
                for t in range(1, T - ADVECT_STEPS, ADVECT_EVERY):
                    pred = flow_advection({"frames": video[:, t - 1:t + 1], "flow_bwd": bwd[:, t - 1:t]}, ADVECT_STEPS)
                    scores = psnr(pred, video[:, t + 1:t + 1 + ADVECT_STEPS])
                    advect_sum, advect_n = advect_sum + float(scores.sum()), advect_n + scores.numel()
            out[split] = {"warp_psnr": warp_sum / max(warp_n, 1),
                          "advect_psnr": advect_sum / advect_n if advect_n else None}
    return out


def merge_flow_reports(reports: list[dict]) -> dict:
    """One report from the shards' reports (rank order): counts summed, quality recomputed, wall time = slowest."""
    if len(reports) == 1:
        return reports[0]
    out = dict(reports[0])
    out["splits"] = {}
    for split in reports[0]["splits"]:
        total = {k: sum(r["splits"][split][k] for r in reports) for k in ("videos", "pairs", "visible_sum", "pixels")}
        out["splits"][split] = {**total, "visible_fraction": total["visible_sum"] / max(total["pixels"], 1)}
    accs = [r["accumulator"] for r in reports if r.get("accumulator") is not None]
    if accs:
        total = QualityAccumulator(accs[0].alpha1, accs[0].alpha2)
        for acc in accs:
            total.merge(acc)
        out["accumulator"] = total
        out["quality"] = {"split": reports[0]["quality"]["split"], **total.result()}
    examples = [r["examples"] for r in reports if r["examples"] is not None]
    if examples:
        order = np.argsort(np.concatenate([e["video"] for e in examples]), kind="stable")
        out["examples"] = {k: np.concatenate([e[k] for e in examples])[order] for k in examples[0]}
    out["pairs"] = sum(r["pairs"] for r in reports)
    seconds = max(r["run"]["seconds"] for r in reports)
    out["run"] = {**reports[0]["run"], "seconds": seconds, "pairs_per_s": out["pairs"] / max(seconds, 1e-9)}
    return out


def _pair_ids(runs):
    """(row, t) of each pair of a batch, in batch order (row: index among the shard's videos)."""
    return [(n, t) for n, t0, t1 in runs for t in range(t0, t1)]


def _examples(pairs: PairBatch, fwd: Tensor, bwd: Tensor, soft: Tensor, gt_vis, idx: list[int]) -> dict:
    """The pairs `idx` of a batch as numpy arrays for the figure."""
    ex = {"first": pairs.first[idx], "second": pairs.second[idx], "bwd": bwd[idx].float().cpu().numpy(),
          "fwd": fwd[idx].float().cpu().numpy(), "occ": soft[idx, 0].float().cpu().numpy()}
    if pairs.gt_bwd is not None:
        ex["gt_bwd"] = pairs.gt_bwd[idx].astype(np.float32)
    if gt_vis is not None:
        ex["gt_vis"] = gt_vis[idx].astype(np.float32) / 255.0
    return ex


def save_figure(examples: dict, path: str | Path, *, title: str) -> None:
    """PNG grid: frame t, frame t+1, backward flow (backend, exact), occlusion (soft, exact visibility)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import flow_to_image

    flows = [torch.from_numpy(examples["bwd"])]
    if "gt_bwd" in examples:
        flows.append(torch.from_numpy(examples["gt_bwd"]))
    W = flows[0].shape[-1]
    # one colour scale per example across backend and exact flow: colourise them side by side
    rgb = flow_to_image(torch.cat(flows, dim=-1)).permute(0, 2, 3, 1).numpy()  # [K,H,n*W,3]
    cols = [("frame t", examples["first"]), ("frame t+1", examples["second"]),
            ("bwd flow (t+1 -> t)", rgb[:, :, :W])]
    if "gt_bwd" in examples:
        cols.append(("exact bwd flow", rgb[:, :, W:2 * W]))
    cols.append(("soft visibility", examples["occ"]))
    if "gt_vis" in examples:
        cols.append(("exact visibility", examples["gt_vis"]))
    K = examples["first"].shape[0]
    fig, axes = plt.subplots(K, len(cols), figsize=(1.9 * len(cols), 1.9 * K + 0.5), squeeze=False)
    for r in range(K):
        for c, (name, arr) in enumerate(cols):
            ax = axes[r, c]
            img = arr[r]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1 if img.ndim == 2 else None,
                      interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def flow_report(report: dict, flow: Flow) -> dict:
    """The JSON-able metrics for reports/flow/metrics.json (no arrays)."""
    info = report["backend_info"]
    q = report["quality"]
    out = {
        "backend": info["backend"],
        "backend_used": info["backend_used"],
        "fallback": int(info["backend_used"] != info["backend"]),  # numeric: visible in `dvc metrics show`
        "fallback_reason": info["fallback_reason"],
        "device": info["device"],
        "num_updates": info["num_updates"],
        "weights": info["weights"],
        "note": info["note"],
        "pairs": report["pairs"],
        "splits": {name: {k: split[k] for k in ("videos", "pairs", "visible_fraction")}
                   for name, split in report["splits"].items()},
        "params": to_dict(flow),
    }
    if q is None:
        out["quality"] = None
        out["quality_note"] = "no exact flow in frames.h5 (real data): EPE / occlusion scores not available"
    else:
        out["quality"] = q
        out["quality_note"] = (
            f"on the {q['split']} split vs the renderer's exact flow: epe / epe_visible / outlier_rate are for "
            f"the backward flow (t+1 -> t, frame t+1's grid; visible = exact visibility), epe_fwd for the forward "
            f"flow; outlier = EPE > {OUTLIER_PX:g} px and > {OUTLIER_REL:.0%} of the exact magnitude. occlusion scores "
            f"compare the hard forward-backward mask with the exact visibility, OCCLUDED (not visible in frame t) "
            f"being the positive class; occlusion_from_exact_flow is the same check run on the exact flows "
            f"(the ceiling of the check itself).")
    return out
