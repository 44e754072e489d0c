"""What stops a run over its checkpoint (light: the CLI catches them before any
heavy import)."""

__all__ = ["UnsavableLayoutError", "CheckpointMismatchError"]


class UnsavableLayoutError(ValueError):
    """The family's checkpoints cannot hold per-expert quantized experts."""


class CheckpointMismatchError(ValueError):
    """The written checkpoint would not load as it was meant to."""
