"""Reliable training: atomic checkpoints, weights-only loading, exact resume, SIGTERM preemption, non-finite steps."""
from zoo.reliability.callbacks import (
    PREEMPTED_EXIT_CODE, NonFiniteError, NonFiniteGuard, PreemptedError, PreemptionCheckpoint, RNGStateCheckpoint,
)
from zoo.reliability.io import (
    AtomicCheckpointIO, CheckpointError, atomic_directory, atomic_write, describe_os_error, ensure_writable_dir,
    explain_safetensors_error, load_checkpoint_file,
)
from zoo.reliability.resume import ResumePoint, checkpoint_files, find_resume_point, trim_metrics

__all__ = [
    "PREEMPTED_EXIT_CODE", "AtomicCheckpointIO", "CheckpointError", "NonFiniteError", "NonFiniteGuard", "PreemptedError",
    "PreemptionCheckpoint", "RNGStateCheckpoint", "ResumePoint", "atomic_directory", "atomic_write",
    "checkpoint_files", "describe_os_error", "ensure_writable_dir", "explain_safetensors_error", "find_resume_point", "load_checkpoint_file", "trim_metrics",
]
