"""Stage encode: frames.h5 + flow.h5 + both VAEs -> data/latents.h5 (per split `z`, `zf`: the VAEs' mu).

Under torchrun (PIPELINE_NPROC=N, see pipeline.launch) each rank encodes every N-th video and rank 0
merges the shards into data/latents.h5 (pipeline.sharding).
"""
import logging

from pipeline.config import load_params
from pipeline.io import setup_logging
from pipeline.distributed import shutdown_distributed
from pipeline.sharding import run_sharded
from pipeline.latents import encode_latents

log = logging.getLogger("pipeline.stages.encode")


def main() -> None:
    setup_logging()
    params = load_params()
    p = params.paths
    try:
        reports = run_sharded(p.latents, lambda path, shard: encode_latents(
            p.frames, p.flow, p.vae, p.flow_vae, path, device=params.device, shard=shard))
    finally:
        shutdown_distributed()
    if reports is None:  # not rank 0
        return
    shapes = ", ".join(f"{s}: z{r['z']} zf{r['zf']}" for s, r in reports[0]["splits"].items())
    seconds = max(r["seconds"] for r in reports)
    log.info(f"encode: {shapes} in {seconds}s on {reports[0]['device']}, {len(reports)} rank(s) -> {p.latents}")


if __name__ == "__main__":
    main()
