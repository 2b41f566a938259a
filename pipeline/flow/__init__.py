"""Optical flow: the project's one warp and occlusion check, and the RAFT / DIS / GT backends.

- `ops`: `warp` (backward bilinear), `occlusion` (UnFlow forward-backward check + out-of-frame),
  `resize_flow`. Every other package imports these; there is no second warp.
- `backends`: `build_backend(flow, device) -> (backend, BackendInfo)`. RAFT weights come from the current
  torch hub dir (<hub>/checkpoints/<file of torchvision's weights.url>), which the flow stage points at the
  pretrained stage's models/pretrained/flow/hub; when the file is missing or unreadable the stage falls
  back to `flow.fallback` with a loud warning, recorded as `backend_used` / `fallback_reason`. Never
  random weights; downloading is the pretrained stage's job, never this package's.
- CPU policy (explicit params, recorded in reports/flow/metrics.json `note`): on CUDA a RAFT backend
  runs as asked (`flow.backend`, `flow.num_updates`, default raft_large x12); on CPU it runs as
  `flow.cpu_raft` with `flow.cpu_num_updates` (default raft_small x3), which keeps the default data
  (72 videos x 31 pairs at 64x64, upsampled to RAFT's 128 px) near 90 s on 2 idle cores.
- `compute`: the stage's work (flow.h5 + report), streamed one batch of pairs at a time.
"""
from pipeline.flow.ops import occlusion, resize_flow, warp

__all__ = ["warp", "occlusion", "resize_flow"]
