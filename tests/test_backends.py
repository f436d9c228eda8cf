"""Backend choice of the recurrent blocks: validation at construction, ``auto`` per device, the model's log line,
and the mamba-ssm adapters' layout conversions (checked on CPU against a stand-in built from our references)."""
import dataclasses
import importlib.machinery
import logging
import subprocess
import sys
import types

import pytest
import torch

from test_blocks import TEST_ARGS
from zoo.config import ModelConfig
from zoo.errors import BackendUnavailableError, ConfigError
from zoo.kernels import selective_scan as ss_pkg
from zoo.kernels import retention as retention_pkg
from zoo.kernels.selective_scan import mamba_ssm_backend as ss_adapter
from zoo.kernels.selective_scan import selective_scan_naive
from zoo.kernels.ssd import mamba_ssm_backend as ssd_adapter
from zoo.kernels.ssd import ssd_scan
from zoo.layers.registry import MIXERS
from zoo.modeling import ZooConfig, ZooForCausalLM

# Every block whose config has a backend, and the backend table of the op it runs (read from the block's module).
OPS = {
    name: sys.modules[MIXERS.get(name).cls.__module__].BACKENDS
    for name in MIXERS.names()
    if "backend" in {f.name for f in dataclasses.fields(MIXERS.get(name).config_cls)} and name != "attention"
}


def build(block, **args):
    spec = ModelConfig.from_dict({"d_model": 48, "n_layers": 1, "blocks": [block], block: {**TEST_ARGS.get(block, {}), **args}})
    return MIXERS.get(block).cls(spec.args_for(block), 48, 0)


# The names backends had before each name meant one algorithm on every op, and the kernel each ran.
RENAMED = {"mamba": {"triton": "triton_recurrent"}, "mamba2": {"triton": "triton_chunk"}, "retnet": {"triton": "triton_chunk_serial"},
           "rwkv6": {"triton": "triton_recurrent"}, "rwkv7": {"triton": "triton_recurrent"}}


@pytest.mark.parametrize("block", sorted(OPS))
def test_auto_stays_on_torch_until_the_triton_kernels_pass_on_a_gpu(block):
    assert OPS[block].resolve("auto") == "torch"
    assert build(block).backend == "auto"


@pytest.mark.parametrize("block", sorted(OPS))
def test_an_old_backend_name_runs_the_same_kernel_and_warns(block):
    """Old recipes and saved configs keep working: the old name is accepted, warns once at the block's construction
    with the name to use, and the block runs the kernel that name ran before (bit for bit the new name's output)."""
    pytest.importorskip("triton")
    table = OPS[block]
    assert table.aliases == RENAMED.get(block, {})
    if block not in RENAMED:
        return  # a block added after the renaming has no old names
    ((old, new),) = RENAMED[block].items()
    with pytest.warns(FutureWarning, match=rf"{table.op} backend '{old}' \({block} block\) is a deprecated name; use '{new}'"):
        renamed = build(block, backend=old)
    assert renamed.backend == new
    current = build(block, backend=new)
    current.load_state_dict(renamed.state_dict())
    x = torch.randn(1, 16, 48)
    torch.testing.assert_close(renamed(x)[0], current(x)[0], rtol=0, atol=0)


def test_retention_triton_with_the_recurrent_form_keeps_its_kernel():
    """The old ``triton`` name of retention ran the fused-recurrent kernels for ``form="recurrent"``."""
    pytest.importorskip("triton")
    q, v = torch.randn(1, 16, 2, 16), torch.randn(1, 16, 2, 16)
    log_decay = torch.tensor([-0.1, -0.5])
    with pytest.warns(FutureWarning, match="use 'triton_recurrent'"):
        old = retention_pkg.retention(q, q, v, log_decay, form="recurrent", backend="triton")
    new = retention_pkg.retention(q, q, v, log_decay, form="chunk", backend="triton_recurrent")
    torch.testing.assert_close(old, new, rtol=0, atol=0)


def test_every_recurrent_block_uses_its_ops_backend_table():
    """The blocks keep no backend tuples: a config's choices are its op's table (derived, not listed), and a recipe's
    unknown name is refused with its key path and every choice."""
    assert set(OPS) == {"gated_deltanet", "kda", "mamba", "mamba2", "retnet", "rwkv6", "rwkv7"}  # the recurrent blocks with an op
    for block, op in OPS.items():
        choices = ", ".join(map(repr, op.choices()))
        with pytest.raises(ConfigError, match=f"model.{block}.backend: expected one of {choices}, got 'nope'"):
            build(block, backend="nope")
        with pytest.raises(ConfigError, match=f"unknown {block} backend 'nope'; choose one of {', '.join(op.choices())}"):
            op.require("nope", block)


def test_import_zoo_leaves_zoos_triton_modules_unloaded():
    """The Triton backends are import paths, loaded on the first call: ``import zoo`` imports none of zoo's Triton
    modules (transformers itself may import triton)."""
    code = "import sys, zoo, zoo.layers; print([m for m in sys.modules if m.startswith('zoo.kernels') and '.triton' in m])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("block", [b for b, table in OPS.items() if "mamba_ssm" in table.names()])
def test_missing_mamba_ssm_is_an_error_not_a_fallback(block, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "mamba_ssm" else find_spec(name, *args))
    with pytest.raises(BackendUnavailableError, match=f"{block} backend 'mamba_ssm' was asked for but the mamba_ssm package is not installed"):
        build(block, backend="mamba_ssm")


@pytest.mark.parametrize("block", [b for b, table in OPS.items() if "mamba_ssm" not in table.names()])
def test_blocks_without_mamba_ssm_reject_it_by_key(block):
    with pytest.raises(ConfigError, match=f"model.{block}.backend: expected one of .*, got 'mamba_ssm'"):
        build(block, backend="mamba_ssm")


def test_an_op_called_with_an_unknown_backend_names_it():
    q = torch.zeros(1, 2, 1, 4)
    with pytest.raises(ValueError, match="retention: unknown backend 'cuda'; choose one of auto, torch, triton_recurrent"):
        retention_pkg.retention(q, q, q, torch.zeros(1), backend="cuda")


def test_model_logs_its_backends_once(caplog):
    spec = ModelConfig.from_dict({"d_model": 32, "n_layers": 4, "blocks": ["mamba2", "attention"], "vocab_size": 20,
                                  "mamba2": {"d_state": 8, "head_dim": 16}})
    with caplog.at_level(logging.INFO, logger="zoo"):
        ZooForCausalLM(ZooConfig.from_model_config(spec))
    lines = [r.getMessage() for r in caplog.records if "backends" in r.getMessage()]
    assert lines == ["zoo model: backends mamba2: auto, attention: auto (auto = torch; triton on request)"]


@pytest.fixture
def fake_mamba_ssm(monkeypatch):
    """Stand-ins for mamba-ssm's kernels in their own layouts ([B, D, T] for Mamba-1), built from zoo's references."""

    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
        assert u.shape[1] == A.shape[0] and B.shape[1] == A.shape[1], "mamba-ssm layout: u [B, D, T], B [B, N, T]"
        y, h = selective_scan_naive(u.mT, delta.mT, A, B.mT, C.mT, D, None if z is None else z.mT, delta_bias, delta_softplus)
        return (y.mT, h) if return_last_state else y.mT

    def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
        y, h = selective_scan_naive(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, None if z is None else z[:, None],
                                    dt_bias, dt_softplus, initial_state=state)
        state.copy_(h)
        return y[:, 0]

    def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                                  dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False):
        y, h = ssd_scan(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_states, chunk_size)
        return (y, h) if return_final_states else y

    modules = {
        "mamba_ssm": {}, "mamba_ssm.ops": {}, "mamba_ssm.ops.triton": {},
        "mamba_ssm.ops.selective_scan_interface": {"selective_scan_fn": selective_scan_fn},
        "mamba_ssm.ops.triton.selective_state_update": {"selective_state_update": selective_state_update},
        "mamba_ssm.ops.triton.ssd_combined": {"mamba_chunk_scan_combined": mamba_chunk_scan_combined},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(ss_adapter, "on_cuda", lambda tensor: True)
    monkeypatch.setattr(ssd_adapter, "on_cuda", lambda tensor: True)


def test_mamba_ssm_adapters_need_cuda_tensors():
    x = torch.zeros(1, 2, 4)
    with pytest.raises(BackendUnavailableError, match="mamba_ssm"):
        ss_pkg.selective_scan(x, x, -torch.ones(4, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), backend="mamba_ssm")


@pytest.mark.parametrize("block", [b for b, table in OPS.items() if "mamba_ssm" in table.names()])
def test_mamba_ssm_adapter_layouts_match_torch_through_the_block(fake_mamba_ssm, block):
    """zoo's adapters to mamba_ssm's entry points (layouts, transposes, states), run on a stand-in built from zoo's own
    scans: the real mamba_ssm kernels need CUDA and are not tested here."""
    torch.manual_seed(0)
    reference = build(block, backend="torch").double()
    fast = build(block, backend="mamba_ssm").double()
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 9, 48, dtype=torch.float64)
    y_ref, state_ref = reference(x)
    y, state = fast(x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(state.ssm, state_ref.ssm)
    step = torch.randn(2, 1, 48, dtype=torch.float64)
    y_ref, next_ref = reference(step, state_ref)
    y, next_state = fast(step, state)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(next_state.ssm, next_ref.ssm)
    if block == "mamba":
        with pytest.raises(BackendUnavailableError, match="cannot start a multi-token scan from a state"):
            fast(x, state)
    else:
        y, _ = fast(x, state)
        torch.testing.assert_close(y, reference(x, state_ref)[0])
