"""Optical flow: the project's one warp and occlusion check, and the RAFT / DIS / GT backends."""
from pipeline.flow.ops import occlusion, resize_flow, warp

__all__ = ["warp", "occlusion", "resize_flow"]
