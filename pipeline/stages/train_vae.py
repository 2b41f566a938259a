"""Stage train_vae: frames.h5 train split -> models/vae.pt, reports/vae/ (test PSNR/SSIM, recon.png)."""
import logging

from pipeline.config import load_params
from pipeline.io import setup_logging
from pipeline.distributed import shutdown_distributed
from pipeline.vae_training import train_vae

log = logging.getLogger("pipeline.stages.train_vae")


def main() -> None:
    setup_logging()
    params = load_params()
    try:
        metrics = train_vae(params)  # {} on ranks other than 0 under torchrun
        if metrics:
            log.info(f"train_vae: test PSNR {metrics['test']['psnr']:.2f} dB, SSIM {metrics['test']['ssim']:.4f}, "
                     f"latent {metrics['latent_shape']}, {metrics['run']['train_seconds']:.0f}s on {metrics['device']} "
                     f"-> {params.paths.vae}")
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
