"""Flow backends side by side on the val split: pairs/s, quality vs the exact flow, and how well they predict frames.

Usage: python bench/bench_flow.py [--frames data/frames.h5] [--pairs 64] [--skip-raft-large]
Reads the VAL split of --frames (default: params' frames.h5, else renders 4 default-size synthetic
videos): this is what chooses flow.dis_preset and flow.dis_scale, so it never reads test. Per row:
speed on --pairs pairs; EPE / occlusion F1 against the renderer's exact flow on those pairs; and over
every val video the photometric measures of pipeline.flow.compute.photometric_quality (warp_psnr:
1-step warp; advect_psnr: 10 frames of constant motion carried with the content), the target
quality that predicts prediction quality. RAFT rows load a locally created RANDOM-weights file from a
temporary torch hub cache through the real loading path: their speed is real, their quality would be
meaningless and is reported as n/a. Rows run on CPU, and on CUDA too when present.
Writes bench/results/flow.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import REPO, save  # noqa: E402
from pipeline.config import Flow, load_params  # noqa: E402
from pipeline.flow.backends import PairBatch, RAFTBackend, build_backend  # noqa: E402
from pipeline.pretrained import hub_path  # noqa: E402
from pipeline.flow.compute import QualityAccumulator, photometric_quality  # noqa: E402
from pipeline.flow.ops import occlusion  # noqa: E402



SPLIT = "val"  # what chooses the flow defaults; test is never read here
DIS_SCALES = (1, 2, 3)


def rows_for(device: torch.device, skip_large: bool, flow: Flow) -> list[tuple[str, Flow]]:
    """(label, flow params) per row; RAFT rows pin the variant and iterations on every device."""
    rows = [("gt", dataclasses.replace(flow, backend="gt"))]
    rows += [(f"dis {p} x{s}", dataclasses.replace(flow, backend="dis", dis_preset=p, dis_scale=s))
             for p in ("ultrafast", "fast", "medium") for s in DIS_SCALES]
    raft = [(flow.cpu_raft, flow.cpu_num_updates, " (cpu default)"), ("raft_small", 12, ""),
            ("raft_large", flow.cpu_num_updates, ""), (flow.backend, flow.num_updates, " (cuda default)")]
    seen = set()
    for variant, it, tag in raft:
        if variant not in ("raft_small", "raft_large") or (variant, it) in seen:
            continue
        seen.add((variant, it))
        if skip_large and variant == "raft_large" and device.type == "cpu":
            continue
        rows.append((f"{variant} x{it}{tag}", dataclasses.replace(flow, backend=variant, cpu_raft=variant,
                                                                   num_updates=it, cpu_num_updates=it)))
    return rows


def stage_pairs() -> int:
    """Frame pairs the flow stage computes for the shipped params: every video x (frames - 1)."""
    data = load_params(REPO / "params.yaml").data
    return sum(data.splits.values()) * (data.frames - 1)


def photometric(backend, frames_h5: Path, tmp: Path) -> dict:
    """photometric_quality of `backend`'s flow on every video of the val split (a temporary flow.h5)."""
    flow_h5 = tmp / "bench_flow.h5"
    with h5py.File(frames_h5, "r") as f, h5py.File(flow_h5, "w") as out:
        video = f[SPLIT]["video"]
        N, T, H, W, _ = video.shape
        bwd = out.create_group(SPLIT).create_dataset("bwd", (N, T - 1, 2, H, W), np.float32)
        exact = f[SPLIT].get("gt_bwd")
        for n in range(N):
            gt = {"gt_fwd": f[SPLIT]["gt_fwd"][n], "gt_bwd": exact[n]} if exact is not None else {}
            _, b = backend(PairBatch.from_clips([video[n]], **gt))
            bwd[n] = b.cpu().numpy()
    return photometric_quality(frames_h5, flow_h5, splits=(SPLIT,))[SPLIT]


def load_pairs(frames_h5: Path, n_pairs: int):
    """Clips of consecutive val frames covering n_pairs pairs, with exact flow and visibility."""
    clips, gf, gb, gv = [], [], [], []
    with h5py.File(frames_h5, "r") as f:
        g = f[SPLIT]
        if "gt_fwd" not in g:
            raise SystemExit(f"{frames_h5}: the {SPLIT} split has no exact flow (gt_fwd); use synthetic data")
        N, T = g["video"].shape[:2]
        left = n_pairs
        for n in range(N):
            k = min(T - 1, left)
            clips.append(g["video"][n, : k + 1])
            gf.append(g["gt_fwd"][n, :k].astype(np.float32))
            gb.append(g["gt_bwd"][n, :k].astype(np.float32))
            gv.append(g["gt_vis"][n, :k] >= 128)
            left -= k
            if left == 0:
                break
    return clips, gf, gb, gv


def run_row(label: str, flow: Flow, device: torch.device, data, batch: int, frames_h5: Path, tmp: Path) -> dict:
    backend, info = build_backend(flow, device)
    if info.fallback_reason:
        raise SystemExit(f"{label}: unexpected fallback: {info.fallback_reason}")
    clips, gf, gb, gv = data
    batches = []
    for clip, f, b, v in zip(clips, gf, gb, gv):
        for t0 in range(0, len(clip) - 1, batch):
            t1 = min(t0 + batch, len(clip) - 1)
            batches.append((PairBatch.from_clips([clip[t0:t1 + 1]], gt_fwd=f[t0:t1], gt_bwd=b[t0:t1]), v[t0:t1]))
    warm = batches[0][0]
    backend(PairBatch(frames=warm.frames, src=warm.src[:2], dst=warm.dst[:2], gt_fwd=warm.gt_fwd[:2],
                      gt_bwd=warm.gt_bwd[:2]))  # warm-up (allocations, cuDNN autotune)
    acc = QualityAccumulator(flow.occ_alpha1, flow.occ_alpha2)
    pairs, seconds, cpu_s = 0, 0.0, 0.0
    for pb, vis in batches:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        fwd, bwd = backend(pb)
        soft, hard = occlusion(bwd, fwd, alpha1=flow.occ_alpha1, alpha2=flow.occ_alpha2)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t
        cpu_s += time.process_time() - c
        pairs += len(pb)
        acc.update(fwd.cpu(), bwd.cpu(), hard.cpu(), torch.from_numpy(pb.gt_fwd), torch.from_numpy(pb.gt_bwd),
                   torch.from_numpy(vis))
    q = acc.result()
    random_weights = isinstance(backend, RAFTBackend)
    na = "n/a (random weights)"
    photo = {"warp_psnr": na, "advect_psnr": na} if random_weights else photometric(backend, frames_h5, tmp)
    return {
        "backend": label, "device": str(device), "backend_used": info.backend_used, "num_updates": info.num_updates,
        "pairs": pairs, "seconds": round(seconds, 3), "pairs_per_s": round(pairs / seconds, 2),
        "cpu_ms_per_pair": round(1000 * cpu_s / pairs, 1),
        "est_default_stage_s": round(stage_pairs() / (pairs / seconds), 1),
        "epe": na if random_weights else round(q["epe"], 4),
        "epe_visible": na if random_weights else round(q["epe_visible"], 4),
        "outlier_rate": na if random_weights else round(q["outlier_rate"], 5),
        "occ_f1": na if random_weights else (None if q["occlusion"]["f1"] is None else round(q["occlusion"]["f1"], 3)),
        **{k: v if isinstance(v, str) else round(v, 3) for k, v in photo.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--frames", default=None)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--skip-raft-large", action="store_true", help="no raft_large rows on CPU (slow)")
    args = parser.parse_args()
    params = load_params(args.params)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        frames = Path(args.frames or params.paths.frames)
        if not frames.is_file():
            from pipeline.data.extract import extract
            from pipeline.data.synthetic import render_dataset
            data = dataclasses.replace(params.data, source="synthetic",
                                       videos=dataclasses.replace(params.data.videos, train=1, val=4, test=1))
            print(f"rendering 4 default-size synthetic {SPLIT} videos into {tmp} ...")
            render_dataset(tmp / "raw", data=data, synthetic=params.synthetic)
            frames = tmp / "frames.h5"
            extract(tmp / "raw", frames, data=data)
        data = load_pairs(frames, args.pairs)
        H, W = data[0][0].shape[1:3]
        # random RAFT weights under the expected file names, in a private torch hub cache (speed only)
        os.environ["TORCH_HOME"] = str(tmp / "torch")
        from torchvision.models import optical_flow
        for variant in ("raft_small", "raft_large"):
            path = hub_path(variant)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(getattr(optical_flow, variant)(weights=None).state_dict(), path)
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        rows = []
        for device in devices:
            # RAFT rows: the shipped params.yaml's settings (a benchmark workspace may run flow.backend=gt)
            for label, flow in rows_for(device, args.skip_raft_large, load_params(REPO / "params.yaml").flow):
                row = run_row(label, flow, device, data, params.flow.batch, frames, tmp)
                rows.append(row)
                print(f"  {row['backend']:<30} {row['device']:<5} {row['pairs_per_s']:>8.1f} pairs/s  advect "
                      f"{row['advect_psnr']} dB", flush=True)
    header = ["backend", "device", "pairs_per_s", "est_default_stage_s", "epe", "epe_visible", "occ_f1",
              "warp_psnr", "advect_psnr"]
    widths = [30, 6, 11, 19, 20, 20, 20, 20, 20]
    print()
    print(" ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print(" ".join(str(row[h]).ljust(w) for h, w in zip(header, widths)))
    result = {"split": SPLIT, "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "frames": str(args.frames or "rendered"),
              "resolution": [H, W], "pairs_per_row": rows[0]["pairs"],
              "torch_threads": torch.get_num_threads(), "batch": params.flow.batch,
              "default_stage_pairs": stage_pairs(),
              "note": "pairs/s = forward + backward flow + occlusion per pair; RAFT rows use random weights "
                      "(speed only; EPE n/a); est_default_stage_s = default data pairs / pairs_per_s; "
                      "epe/outlier_rate on the backward flow, occ_f1 with occluded as the positive class",
              "rows": rows}
    print(f"wrote {save('flow', result)}")


if __name__ == "__main__":
    main()
