"""Stage download: data.source -> data/raw (CLEVRER layout) with data/raw/download_report.json.

synthetic renders the videos locally; clevrer fetches the requested subset of the official archives.
The raw dir is built in a temporary sibling and renamed into place only when complete. The download
cache (partial and fetched archive data, for resuming) is data/.download_cache/, outside the DVC out.
"""
import logging
from pathlib import Path

from pipeline.config import load_params
from pipeline.io import atomic_path, setup_logging, split_run_info, write_json

log = logging.getLogger("pipeline.stages.download")

REPORT_NAME = "download_report.json"


def cache_dir_for(raw: str | Path) -> Path:
    """The resume cache next to the raw dir: DVC deletes the out itself before running the stage."""
    return Path(raw).parent / ".download_cache"


def main() -> None:
    setup_logging()
    params = load_params()
    raw = Path(params.paths.raw)
    with atomic_path(raw) as tmp:
        tmp.mkdir(parents=True)
        if params.data.source == "synthetic":
            from pipeline.data.synthetic import render_dataset
            report = render_dataset(tmp, data=params.data, synthetic=params.synthetic)
        else:
            from pipeline.data.clevrer import DownloadError, download_clevrer
            try:
                report = download_clevrer(tmp, data=params.data, cache_dir=cache_dir_for(raw))
            except DownloadError as err:
                raise SystemExit(f"download: {err}") from None
        report, run = split_run_info(report)
        write_json(tmp / REPORT_NAME, report)
    n_videos = sum(1 for _ in raw.glob("videos/*/*/*.mp4"))
    extra = f", {run['bytes_downloaded'] / 2**20:.1f} MiB downloaded" if "bytes_downloaded" in run else ""
    log.info(f"download: {params.data.source}: {n_videos} videos in {run.get('seconds', '?')} s{extra} -> {raw}")


if __name__ == "__main__":
    main()
