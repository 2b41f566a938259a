"""Stage train_temporal: frames.h5, flow.h5, latents.h5, both VAEs -> models/temporal.pt, reports/temporal/."""
import logging
import json

from pipeline.config import load_params
from pipeline.io import setup_logging, split_run_info, write_json
from pipeline.temporal_training import train_temporal
from pipeline.distributed import shutdown_distributed

log = logging.getLogger("pipeline.stages.train_temporal")


def main() -> None:
    setup_logging()
    params = load_params()
    try:
        report = train_temporal(params)
    finally:
        shutdown_distributed()
    if not report:  # not rank 0
        return
    report, run = split_run_info(report)
    path = params.paths.report_dir("temporal") / "metrics.json"
    logged = json.loads(path.read_text()) if path.is_file() else {}  # dvclive's summary of the last step
    write_json(path, {**logged, **report})
    gain = report.get("val_psnr_step1_gain")
    log.info(f"train_temporal: {report['arch']} {report['steps']} steps in {run['train_seconds']} s, "
             f"loss {report['loss'].get('total')}"
             + (f", val 1-step PSNR {report['val_psnr_step1']} dB ({gain:+.2f} dB vs copy-last)" if gain is not None else "")
             + f" -> {params.paths.temporal}")


if __name__ == "__main__":
    main()
