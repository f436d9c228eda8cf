"""The choices a GPU user gets, checked on CPU: precision ``auto``, fused AdamW, gradient clipping under bf16 and fp16
mixed precision, and every other branch that reads the device (CUDA answers faked by monkeypatching)."""
import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

import zoo.layers.attention as attention
from zoo.layers.moe import grouped_mm_supported
from zoo.precision import ZooMixedPrecision, precision_plugin, resolve_fused, resolve_precision


def fake_cuda(monkeypatch, available=True, bf16=True, capability=(9, 0)):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)


@pytest.mark.parametrize(
    "available, bf16, accelerator, expected",
    [
        (True, True, "auto", "bf16-mixed"),  # A100/H100/RTX 30xx+
        (True, True, "gpu", "bf16-mixed"),
        (True, False, "auto", "32-true"),  # V100/T4: no bf16
        (True, True, "cpu", "32-true"),  # a GPU machine told to train on CPU
        (False, False, "auto", "32-true"),
    ],
)
def test_precision_auto_follows_the_device(monkeypatch, available, bf16, accelerator, expected):
    fake_cuda(monkeypatch, available, bf16)
    assert resolve_precision("auto", accelerator) == expected
    assert resolve_precision("16-mixed", accelerator) == "16-mixed"  # an explicit choice is kept


def test_mixed_precision_gets_zoos_plugin_on_the_device_it_runs(monkeypatch):
    fake_cuda(monkeypatch)
    plugin = precision_plugin("bf16-mixed", "auto", "ddp")
    assert isinstance(plugin, ZooMixedPrecision) and plugin.device == "cuda" and plugin.scaler is None
    assert precision_plugin("bf16-mixed", "cpu", "auto").device == "cpu"
    assert precision_plugin("16-mixed", "cpu", "auto").scaler is not None  # real fp16 + GradScaler on CPU
    assert precision_plugin("32-true", "auto", "auto") is None
    assert precision_plugin("bf16-mixed", "auto", "fsdp") is None  # FSDP brings its own precision plugin


def test_fused_adamw_is_picked_for_cpu_and_cuda_parameters_alike():
    assert resolve_fused(None, [torch.zeros(2), torch.zeros(3, dtype=torch.bfloat16)])
    assert not resolve_fused(None, [torch.zeros(2, device="meta")])
    assert not resolve_fused(None, [torch.zeros(2, dtype=torch.int64)])
    assert resolve_fused(False, [torch.zeros(2)]) is False


def test_grouped_mm_needs_hopper_on_cuda(monkeypatch):
    cuda = torch.device("cuda", 0)
    for capability, expected in [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)]:
        fake_cuda(monkeypatch, capability=capability)
        assert grouped_mm_supported(torch.bfloat16, cuda, 64, 128) is expected, capability
    assert not grouped_mm_supported(torch.float16, cuda, 64, 128)
    assert not grouped_mm_supported(torch.bfloat16, cuda, 64, 100)  # not 16-byte aligned


def test_attention_auto_picks_flash_attn_only_for_cuda_half_inputs(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    assert attention.auto_attention_backend("cuda", torch.bfloat16) == "flash_attn"
    assert attention.auto_attention_backend("cuda", torch.float16) == "flash_attn"
    assert attention.auto_attention_backend("cuda", torch.float32) == "sdpa"
    assert attention.auto_attention_backend("cpu", torch.bfloat16) == "sdpa"
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    assert attention.auto_attention_backend("cuda", torch.bfloat16) == "sdpa"


def test_recurrent_backend_auto_is_torch_on_a_gpu_too(monkeypatch):
    import importlib
    import pkgutil

    import zoo.kernels
    from zoo.kernels.backends import BackendTable

    fake_cuda(monkeypatch)
    ops = [importlib.import_module(f"zoo.kernels.{m.name}") for m in pkgutil.iter_modules(zoo.kernels.__path__) if m.ispkg]
    tables = [op.BACKENDS for op in ops if isinstance(getattr(op, "BACKENDS", None), BackendTable)]
    assert len(tables) == 5
    for table in tables:
        assert table.resolve("auto") == "torch", table.op  # until the Triton kernels pass `pytest -m gpu`


class Regression(L.LightningModule):
    """A linear regression whose gradient norm (about 3) is clipped, small enough that fp16's first scale (2^16)
    does not overflow."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.layer = nn.Linear(16, 16)
        self.seen: list[dict] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.layer(x).float() - y).square().mean()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3, fused=self.fused)
        step = optimizer.step

        def recording_step(closure=None, **kwargs):
            loss = closure() if closure is not None else None  # bf16: Lightning runs forward and backward in here
            grads = [p.grad for p in self.parameters()]
            self.seen.append({"norm": float(torch.nn.utils.get_total_norm(grads)), "grad_scale": getattr(optimizer, "grad_scale", None)})
            step(**kwargs)
            return loss

        optimizer.step = recording_step
        return optimizer


def fit(precision: str, fused: bool, clip: float):
    torch.manual_seed(0)
    x, y = torch.randn(32, 16), torch.randn(32, 16) * 3
    loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=8)
    module = Regression(fused)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, gradient_clip_val=clip, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, plugins=[precision_plugin(precision, "cpu", "auto")],
    )
    trainer.fit(module, loader)
    return module


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("fused", [True, False])
def test_gradient_clipping_under_mixed_precision_with_fused_adamw(precision, fused):
    """The optimizer step sees unscaled gradients clipped to the norm asked for, and fp16's GradScaler hands a fused
    AdamW no second scale to divide by."""
    module = fit(precision, fused, clip=0.5)
    assert len(module.seen) == 3
    for seen in module.seen:
        assert seen["norm"] == pytest.approx(0.5, rel=1e-3)
        assert seen["grad_scale"] is None
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_lightnings_own_amp_plugin_refuses_this():
    """Why zoo has its own plugin: Lightning's refuses to clip with a fused optimizer, even for bf16 (no scaler)."""
    layer = nn.Linear(2, 2)
    layer(torch.randn(3, 2)).sum().backward()
    optimizer = torch.optim.AdamW(layer.parameters(), fused=True)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        MixedPrecision("bf16-mixed", "cpu").clip_gradients(optimizer, 1.0)
    ZooMixedPrecision("bf16-mixed", "cpu").clip_gradients(optimizer, 1e-3)
    assert float(torch.nn.utils.get_total_norm([p.grad for p in layer.parameters()])) == pytest.approx(1e-3, rel=1e-3)


def test_fp16_gradscaler_with_clipping_in_plain_torch():
    """The fp16 recipe zoo's plugin follows, in plain torch: scale, unscale_, clip, step with a fused AdamW (it must not
    unscale again) equals an fp32 AdamW step on the same clipped gradients."""
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    reference = nn.Linear(8, 8)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    fused = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = (model(x).float() - y).square().mean()
    scaler.scale(loss).backward()
    scaler.unscale_(fused)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    scaler.step(fused)
    scaler.update()
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for p, q in zip(reference.parameters(), model.parameters()):
        p.grad = q.grad.clone()  # the clipped, unscaled fp16-autocast gradients
    plain.step()
    for p, q in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)
