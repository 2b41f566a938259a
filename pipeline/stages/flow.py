"""Stage flow: data/frames.h5 -> data/flow.h5, reports/flow/metrics.json, reports/flow/figures/flow.png.

Under torchrun (PIPELINE_NPROC=N, see pipeline.launch) each rank computes every N-th video and rank 0
merges the shards into data/flow.h5 (pipeline.sharding).
"""
import logging

from pipeline.config import load_params
from pipeline.distributed import shutdown_distributed
from pipeline.flow.compute import compute_flow, flow_report, merge_flow_reports, photometric_quality, save_figure
from pipeline.io import atomic_path, resolve_device, setup_logging, write_json
from pipeline.pretrained import hub_dir, weights_dir
from pipeline.sharding import run_sharded

log = logging.getLogger("pipeline.stages.flow")


def main() -> None:
    setup_logging()
    params = load_params()
    try:
        with hub_dir(weights_dir(params.paths.pretrained, "flow")):  # RAFT weights from the pretrained stage
            reports = run_sharded(params.paths.flow, lambda path, shard: compute_flow(
                params.paths.frames, path, flow=params.flow, device=resolve_device(params.device), shard=shard))
    finally:
        shutdown_distributed()
    if reports is None:  # not rank 0
        return
    report = merge_flow_reports(reports)
    metrics = flow_report(report, params.flow)
    metrics["photometric"] = photometric_quality(params.paths.frames, params.paths.flow)
    report_dir = params.paths.report_dir("flow")
    (report_dir / "figures").mkdir(parents=True, exist_ok=True)  # a DVC out even when there is no figure
    if report["examples"] is not None:
        with atomic_path(report_dir / "figures" / "flow.png") as tmp:
            save_figure(report["examples"], tmp, title=f"flow backend: {metrics['backend_used']}")
    write_json(report_dir / "metrics.json", metrics)
    q = metrics["quality"]
    quality = f", test EPE {q['epe']:.3f} px, occlusion F1 {q['occlusion']['f1']}" if q else ""
    photo = metrics["photometric"].get("val") or {}
    if photo:
        quality += f", val warp PSNR {photo['warp_psnr']:.2f} dB"
        if photo["advect_psnr"] is not None:
            quality += f", advect PSNR {photo['advect_psnr']:.2f} dB"
    fallback = f" (FALLBACK from {metrics['backend']}: {metrics['fallback_reason']})" if metrics["fallback_reason"] else ""
    run = report["run"]
    log.info(f"flow: {metrics['backend_used']}{fallback} on {metrics['device']}, {metrics['pairs']} pairs, "
             f"{run['pairs_per_s']:.1f} pairs/s{quality}, {run['ranks']} rank(s) -> {params.paths.flow}")


if __name__ == "__main__":
    main()
