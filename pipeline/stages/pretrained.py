"""Stage pretrained: the torchvision weights the params ask for -> models/pretrained/{flow,lpips,encoder}/.

Each consumer dir is a torch hub dir (hub/checkpoints/<file>) with a manifest.json saying what is there and
why anything is missing; flow, train_temporal and evaluate load from theirs (pipeline.pretrained).
"""
import logging

from pipeline.config import load_params
from pipeline.io import setup_logging
from pipeline.pretrained import provide, requested_weights

log = logging.getLogger("pipeline.stages.pretrained")


def main() -> None:
    setup_logging()
    params = load_params()
    requests = requested_weights(flow_backend=params.flow.backend, cpu_raft=params.flow.cpu_raft,
                                 lpips_net=params.eval.lpips_net, arch=params.model.arch, encoder=params.model.encoder)
    result = provide(requests, params.paths.pretrained, download=params.weights.download,
                     mirror=params.weights.url or None, log=log.info)
    run = result["run"]
    for consumer, manifest in result["consumers"].items():
        for w in manifest["weights"]:
            state = "available" if w["available"] else f"MISSING ({w['reason']})"
            log.info("%s: %s %s", consumer, w["file"], state)
    log.info(f"pretrained: {len(run['fetched'])} fetched, {len(run['from_cache'])} from the torch hub cache, "
             f"{len(run['missing'])} missing -> {params.paths.pretrained}")


if __name__ == "__main__":
    main()
