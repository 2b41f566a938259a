"""Run a stage in one process, or under torchrun when PIPELINE_NPROC > 1: `python -m pipeline.launch <stage>`.

Training stages then train with DDP; flow and encode shard the videos across the processes and merge
their files (pipeline.sharding). On one machine the processes are local workers (--standalone).

The environment switch leaves dvc.yaml's cmd unchanged, so a DDP run and a single-process run of
the same params share the DVC cache (they compute the same update: see pipeline/training.py).
"""
import os
import runpy
import sys

STAGES = ("flow", "train_vae", "train_flow_vae", "encode", "train_temporal")


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in STAGES:
        raise SystemExit(f"usage: python -m pipeline.launch <stage>; stages: {', '.join(STAGES)}")
    module = f"pipeline.stages.{sys.argv[1]}"
    raw = os.environ.get("PIPELINE_NPROC", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise SystemExit(f"PIPELINE_NPROC={raw!r}: expected a positive integer (processes per node)")
    if int(raw) > 1 and "LOCAL_RANK" not in os.environ:
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={raw}", "-m", module]
        os.execv(sys.executable, args)
    sys.argv = [module]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
