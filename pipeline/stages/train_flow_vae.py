"""Stage train_flow_vae: flow.h5 `bwd` train split -> models/flow_vae.pt, reports/flow_vae/ (test EPE, figure)."""
from pipeline.config import load_params
from pipeline.distributed import shutdown_distributed
from pipeline.vae_training import train_flow_vae


def main() -> None:
    params = load_params()
    try:
        metrics = train_flow_vae(params)  # {} on ranks other than 0 under torchrun
        if metrics:
            t = metrics["test"]
            print(f"train_flow_vae: test EPE {t['epe']:.4f}px (zero flow {t['epe_zero_flow']:.4f}px), "
                  f"moving pixels {t['epe_moving']}px (zero flow {t['epe_moving_zero_flow']}px), "
                  f"latent {metrics['latent_shape']}, {metrics['run']['train_seconds']:.0f}s -> {params.paths.flow_vae}")
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
