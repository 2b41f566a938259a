"""CLEVRER next-frame prediction as a DVC pipeline."""
import os

# Every stage runs as `python -m pipeline.stages.<name>`, so this runs before torch is imported.
# OpenMP's default spin-waiting makes torch's threads burn cores other processes need: on a shared
# 2-core CPU, RAFT ran 2-4x slower with it than with sleeping waits. A value in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
