"""Stage control: the dual_vae checkpoint + eval.split videos -> reports/control/ (transfer strips, leakage metrics).

For another model.arch it writes a report saying control does not apply, so the DAG stays one DAG.
"""
import logging

from pipeline.config import load_params
from pipeline.control import control, write_control_figures
from pipeline.io import setup_logging, write_json

log = logging.getLogger("pipeline.stages.control")


def main() -> None:
    setup_logging()
    params = load_params()
    report, figures = control(params)
    out = params.paths.report_dir("control")
    write_control_figures(figures, out / "figures", count=params.control.figures, context=params.eval.context)
    write_json(out / "metrics.json", report)
    if not report["applies"]:
        log.info(f"control: {report['reason']}")
        return
    m, leak = report["methods"], report["leakage"]["predicted"]
    log.info(f"control: {report['pairs']} {params.eval.split} pairs; transfer motion EPE "
             f"{m['transfer']['epe_moving']['mean']} px on moving pixels (zero flow {m['zero_flow']['epe_moving']['mean']}, "
             f"copy B {m['copy_b']['epe_moving']['mean']}); leakage (predicted latents): flow from appearance "
             f"{leak['flow_from_appearance']}, colour from motion {leak['colour_from_motion']} -> {out}")


if __name__ == "__main__":
    main()
