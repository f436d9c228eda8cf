"""Training precision and optimizer choices that depend on the device, resolved the same way on CPU and GPU.

``trainer.precision: auto`` is bf16-mixed on a CUDA GPU that supports bf16 and 32-true elsewhere. Mixed precision
runs through :class:`ZooMixedPrecision`, Lightning's AMP plugin with gradient clipping that works with a fused
AdamW: bf16 has no GradScaler, so the gradients are clipped as they are; fp16 unscales them first (``GradScaler``
then tells the fused step they are unscaled). Lightning's own plugin refuses to clip with a fused optimizer, which is
what ``optimizer.fused: null`` picks on CUDA and CPU alike.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch.optim import Optimizer

MIXED = ("bf16-mixed", "16-mixed")
# Strategies that bring a precision plugin of their own (sharded gradients are clipped by the strategy).
OWN_PRECISION_STRATEGIES = ("fsdp", "deepspeed", "xla")


def on_cuda(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` setting runs this process on a CUDA GPU."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(precision: str, accelerator: str) -> str:
    """The Lightning precision string for ``trainer.precision`` (``auto``: bf16-mixed on a bf16-capable CUDA GPU)."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if on_cuda(accelerator) and torch.cuda.is_bf16_supported() else "32-true"


def resolve_fused(fused: bool | None, params: list[torch.Tensor]) -> bool:
    """``optimizer.fused``: None picks fused AdamW when every parameter is a floating-point CUDA or CPU tensor."""
    if fused is not None:
        return fused
    return all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)


def precision_plugin(precision: str, accelerator: str, strategy: str) -> "ZooMixedPrecision | None":
    """zoo's AMP plugin for a mixed precision on CPU or CUDA; None where Lightning's own choice applies (full or
    half precision, or a strategy with its own plugin)."""
    if precision not in MIXED or strategy.split("_")[0] in OWN_PRECISION_STRATEGIES:
        return None
    return ZooMixedPrecision(precision, "cuda" if on_cuda(accelerator) else "cpu")


class ZooMixedPrecision(MixedPrecision):
    """Lightning's AMP plugin (``torch.autocast``; a ``GradScaler`` for fp16) whose gradient clipping also works
    with optimizers that unscale inside their step (fused AdamW).

    fp16 on CPU really runs fp16 autocast with a CPU ``GradScaler`` (Lightning's own plugin would switch to bf16).
    """

    def optimizer_step(self, optimizer: Optimizer, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        if self.scaler is None:
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        closure_result = closure()
        skip_unscaling = closure_result is None and model.automatic_optimization
        if not skip_unscaling:
            # Always unscale before the hooks and the clipping, also for a fused optimizer: GradScaler.step then
            # passes it no scale, so the gradients are not divided twice.
            self.scaler.unscale_(optimizer)
        self._after_closure(model, optimizer)
        if skip_unscaling:
            return closure_result
        step_output = self.scaler.step(optimizer, **kwargs)  # skipped when the gradients overflowed
        self.scaler.update()
        return step_output

    def clip_gradients(
        self, optimizer: Optimizer, clip_val: int | float = 0.0, gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM
    ) -> None:
        """Clip the (already unscaled) gradients, whatever the optimizer."""
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)
