"""Stage infer: eval.split videos + trained models -> data/predictions.h5 (rollouts, TTT, 1-step, baselines)."""
import logging
import json

from pipeline.config import load_params
from pipeline.io import setup_logging
from pipeline.inference import infer

log = logging.getLogger("pipeline.stages.infer")


def main() -> None:
    setup_logging()
    params = load_params()
    summary = infer(params)
    fps = {k: round(v, 2) for k, v in summary["frames_per_second"].items()}
    ttt = summary["ttt"]
    ttt_line = (f"TTT {ttt['steps']} steps on {ttt['params']} ({ttt['num_parameters']} weights): context loss "
                f"{ttt.get('loss_before_mean')} -> {ttt.get('loss_after_mean')}" if ttt["supported"]
                else f"TTT skipped: {ttt['reason']}")
    log.info(f"infer: {summary['videos']} {params.eval.split} videos, methods {summary['methods']}; {ttt_line}; "
             f"frames/s {json.dumps(fps)} -> {params.paths.predictions}")


if __name__ == "__main__":
    main()
