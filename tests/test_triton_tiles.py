"""The tiles zoo's Triton launchers pick per GPU target, checked on CPU: ``torch.cuda.get_device_capability`` is faked,
so the choice an A100, RTX 4090 or H100 user gets is pinned here; and the H100 tiles of the chunked retention kernels,
which differ from the interpreter's, run in the interpreter against the reference."""
import pytest
import torch

pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from test_triton_retention import check_against_reference, make_inputs  # noqa: E402
from triton_testing import gpu_operands  # noqa: E402
from zoo.kernels.retention import triton_retention  # noqa: E402
from zoo.kernels.retention.triton_retention import ChunkTiles, chunk_tiles  # noqa: E402
from zoo.kernels.selective_scan import triton_scan  # noqa: E402
from zoo.kernels.ssd import triton_ssd  # noqa: E402
from zoo.kernels.triton_common import (  # noqa: E402
    DEFAULT_TARGET, ROCM_TARGET, Launch, RecurrentTiles, Target, launch_target, operand_dtype, recurrent_tiles,
)

GPUS = {"A100": (8, 0), "RTX 3090": (8, 6), "RTX 4090": (8, 9), "H100": (9, 0), "B200": (10, 0), "RTX 5090": (12, 0)}
CUDA = torch.device("cuda", 0)
BF16, FP32 = torch.bfloat16, torch.float32


def fake_gpu(monkeypatch, name: str) -> Target:
    """Make ``torch.cuda`` answer for GPU ``name``; return the target zoo's launchers then see on ``cuda:0``."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: GPUS[name])
    return launch_target(CUDA)


@pytest.mark.parametrize("name", GPUS)
def test_launch_target_is_read_from_the_device(monkeypatch, name):
    major, minor = GPUS[name]
    assert fake_gpu(monkeypatch, name) == Target(10 * major + minor)
    assert launch_target(torch.device("cpu")) == DEFAULT_TARGET


class _MI250Driver:
    """Triton's active driver for an MI250 that is not there: only its target."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("hip", "gfx90a", 64)


def test_rocm_gets_the_default_tiles(monkeypatch):
    """An MI250 reports capability 9.0, like an H100: it must not get the H100's tiles (nor tf32 products)."""
    from triton.runtime import driver

    monkeypatch.setattr(torch.version, "hip", "6.2")
    monkeypatch.setattr(driver, "_active", _MI250Driver())
    target = fake_gpu(monkeypatch, "H100")
    assert target == ROCM_TARGET == DEFAULT_TARGET._replace(tensor_cores=True)
    assert operand_dtype(BF16, target) == tl.bfloat16 and operand_dtype(BF16, DEFAULT_TARGET) == tl.float32
    assert chunk_tiles(64, 128, 64, BF16, target) == ChunkTiles(16, 64, 16, Launch(4, 1))


@pytest.mark.parametrize("name, dtype, K, V, expected", [
    # the largest spill-free tiles, the same on every GPU
    ("H100", BF16, 64, 128, ChunkTiles(16, 64, 16, Launch(4, 1))),
    ("H100", FP32, 64, 128, ChunkTiles(16, 64, 32, Launch(8, 1))),
    ("H100", BF16, 128, 256, ChunkTiles(16, 128, 16, Launch(8, 1))),
    ("H100", FP32, 128, 256, ChunkTiles(16, 128, 16, Launch(8, 1))),
    ("A100", BF16, 64, 128, ChunkTiles(16, 64, 16, Launch(4, 1))),
    ("RTX 3090", BF16, 64, 128, ChunkTiles(16, 64, 16, Launch(4, 1))),
    ("RTX 4090", FP32, 64, 128, ChunkTiles(16, 64, 32, Launch(8, 1))),
    ("A100", BF16, 128, 256, ChunkTiles(16, 128, 16, Launch(8, 1))),
    ("RTX 4090", FP32, 128, 256, ChunkTiles(16, 128, 16, Launch(8, 1))),
    # targets zoo is not compiled for get the safe (sm_80 / 86 / 89) tiles
    ("B200", BF16, 64, 128, ChunkTiles(16, 64, 16, Launch(4, 1))),
    ("RTX 5090", BF16, 64, 128, ChunkTiles(16, 64, 16, Launch(4, 1))),
])
def test_chunked_retention_tiles_per_gpu(monkeypatch, name, dtype, K, V, expected):
    assert chunk_tiles(K, V, 64, dtype, fake_gpu(monkeypatch, name)) == expected


def test_chunked_retention_tiles_follow_chunk_size_and_small_heads(monkeypatch):
    h100 = fake_gpu(monkeypatch, "H100")
    assert chunk_tiles(64, 128, 16, BF16, h100).BT == 16  # a smaller chunk_size is kept
    assert chunk_tiles(64, 128, 200, BF16, h100).BT == 16  # a larger one is capped
    assert chunk_tiles(8, 8, 64, FP32, h100)[:3] == (16, 16, 16)  # tl.dot's minimum of 16
    assert chunk_tiles(64, 128, 64, torch.float16, h100) == chunk_tiles(64, 128, 64, BF16, h100)


@pytest.mark.parametrize("name", GPUS)
def test_other_kernels_pick_the_same_tiles_on_every_gpu(monkeypatch, name):
    target = fake_gpu(monkeypatch, name)
    for dtype in (BF16, FP32):
        assert recurrent_tiles(64, 64, dtype, target) == RecurrentTiles(64, 32, Launch(4, 3))
        assert recurrent_tiles(128, 128, dtype, target) == RecurrentTiles(128, 32, Launch(8, 3))
        assert triton_scan.tiles(1536, 16, dtype, target) == triton_scan.Tiles(2, 16, Launch(1, 3))
        assert triton_scan.tiles(1536, 64, dtype, target) == triton_scan.Tiles(1, 64, Launch(2, 3))
    passing = (64, Launch(1, 3))
    # SSD: the same forward tiles everywhere; the backward's (channel, d_state) blocks larger on sm_90 for 16-bit inputs
    ssd_bwd = (32, 32) if name == "H100" else (16, 32)
    for dtype, operand in ((BF16, tl.bfloat16), (torch.float16, tl.float16)):  # tf32x3 products of fp32 intermediates
        assert triton_ssd.tiles(64, 128, 64, dtype, target) == triton_ssd.Tiles(
            64, 32, 16, "tf32x3", operand, Launch(8, 1), *ssd_bwd, Launch(8, 1), *passing)
        assert triton_ssd.tiles(128, 64, 256, dtype, target)[:4] == (64, 32, 16, "tf32x3")
        assert triton_ssd.tiles(24, 12, 8, dtype, target)[:3] == (16, 32, 16)
    # fp32: exact products, smaller tiles
    assert triton_ssd.tiles(64, 128, 64, FP32, target) == triton_ssd.Tiles(
        64, 16, 16, "ieee", tl.float32, Launch(4, 1), 16, 32, Launch(8, 1), *passing)
    assert triton_ssd.tiles(64, 64, 32, FP32, target)[:4] == (32, 16, 16, "ieee")


@pytest.mark.parametrize("dtype, K, expected", [
    (torch.bfloat16, 24, (16, 32, 16)),
    (torch.float16, 24, (16, 32, 16)),
    (torch.bfloat16, 72, (16, 128, 16)),  # K > 64: the products contracting K run in halves
])
def test_h100_chunked_retention_tiles_match_the_reference(monkeypatch, dtype, K, expected):
    """The interpreter runs what an H100 runs with half-precision inputs, its tiles (the interpreter's own) and the
    16-bit operands of the products of inputs alone (emulated exactly): outputs, final state and every gradient
    still match the recurrent reference; V = 72 spans several V blocks, T = 70 ends inside a chunk."""
    used = []

    def spy(*args):
        used.append(chunk_tiles(*args))
        return used[-1]

    monkeypatch.setattr(triton_retention, "chunk_tiles", spy)
    with gpu_operands(Target(90)) as seen:
        check_against_reference(make_inputs(T=70, K=K, V=72), dtype, "chunk", 64)
    assert len(used) == 2 and all(t[:3] == expected for t in used)  # forward and backward
    half = "bf16" if dtype == torch.bfloat16 else "fp16"
    assert half in seen["_retention_chunk_fwd_kernel"] and half in seen["_retention_chunk_bwd_kernel"]
