"""CLEVRER next-frame prediction as a DVC pipeline."""
