"""Stage extract: data/raw (CLEVRER layout) -> data/frames.h5, reports/extract/metrics.json."""
import logging

from pipeline.config import load_params
from pipeline.data.extract import extract
from pipeline.io import setup_logging, split_run_info, write_json

log = logging.getLogger("pipeline.stages.extract")


def main() -> None:
    setup_logging()
    params = load_params()
    report, run = split_run_info(extract(params.paths.raw, params.paths.frames, data=params.data))
    write_json(params.paths.report_dir("extract") / "metrics.json", report)
    log.info(f"extract: {report['videos']} videos, {report['bad_videos']} skipped, "
             f"{run['frames_per_second']} frames/s -> {params.paths.frames}")


if __name__ == "__main__":
    main()
