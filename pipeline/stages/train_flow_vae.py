"""Stage train_flow_vae: flow.h5 `bwd` train split -> models/flow_vae.pt, reports/flow_vae/ (test EPE, figure)."""
import logging

from pipeline.config import load_params
from pipeline.io import setup_logging
from pipeline.distributed import shutdown_distributed
from pipeline.vae_training import train_flow_vae

log = logging.getLogger("pipeline.stages.train_flow_vae")


def main() -> None:
    setup_logging()
    params = load_params()
    try:
        metrics = train_flow_vae(params)  # {} on ranks other than 0 under torchrun
        if metrics:
            t = metrics["test"]
            log.info(f"train_flow_vae: test EPE {t['epe']:.4f}px (zero flow {t['epe_zero_flow']:.4f}px), "
                     f"moving pixels {t['epe_moving']}px (zero flow {t['epe_moving_zero_flow']}px), "
                     f"latent {metrics['latent_shape']}, {metrics['run']['train_seconds']:.0f}s "
                     f"-> {params.paths.flow_vae}")
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
