"""The one error for files that cannot be trusted: missing, incomplete, corrupt, unsafe, or not
matching the model.  checkpoint/ and hf/ raise it alike (so a caller catches one class);
`parallel_adapters.checkpoint.layout.CheckpointError` is this class."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, unsafe, or does not match the model."""
