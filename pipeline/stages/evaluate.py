"""Stage evaluate: predictions.h5 + frames.h5 -> reports/metrics.json, reports/plots/, reports/figures/."""
import json

from pipeline.config import load_params
from pipeline.evaluation import evaluate


def main() -> None:
    params = load_params()
    metrics = evaluate(params)
    print("evaluate: " + json.dumps(metrics))


if __name__ == "__main__":
    main()
