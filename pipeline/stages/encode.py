"""Stage encode: frames.h5 + flow.h5 + both VAEs -> data/latents.h5 (per split `z`, `zf`: the VAEs' mu)."""
import os

from pipeline.config import load_params
from pipeline.vae_training import encode_latents


def main() -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun one process encodes; it is cheap next to training
        return
    params = load_params()
    p = params.paths
    report = encode_latents(p.frames, p.flow, p.vae, p.flow_vae, p.latents, device=params.device)
    shapes = ", ".join(f"{s}: z{r['z']} zf{r['zf']}" for s, r in report["splits"].items())
    print(f"encode: {shapes} in {report['seconds']}s on {report['device']} -> {p.latents}")


if __name__ == "__main__":
    main()
