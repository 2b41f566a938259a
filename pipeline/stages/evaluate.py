"""Stage evaluate: predictions.h5 + frames.h5 -> reports/metrics.json, reports/plots/, reports/figures/."""
import logging
import json

from pipeline.config import load_params
from pipeline.io import setup_logging
from pipeline.evaluation import evaluate

log = logging.getLogger("pipeline.stages.evaluate")


def main() -> None:
    setup_logging()
    params = load_params()
    metrics = evaluate(params)
    log.info("evaluate: " + json.dumps(metrics))


if __name__ == "__main__":
    main()
