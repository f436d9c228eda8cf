"""GPU hazards the Triton interpreter hides (issue 26), each checked on CPU: pointer offsets that wrap in int32 (read
from the sm_90 TTIR, compiled without a GPU), grids over CUDA's y / z limit (meta tensors), and launches outside the
inputs' device (a recorded ``torch.cuda.device``)."""
import contextlib
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
from collections import defaultdict

import pytest
import torch

pytest.importorskip("triton")

import zoo.kernels  # noqa: E402
from zoo.kernels import registry, triton_common  # noqa: E402
from zoo.kernels.registry import CALLS_BY_NAME, TRITON_CALLS, launches  # noqa: E402
from zoo.kernels.triton_common import MAX_GRID_YZ  # noqa: E402

# The two chunk-state pass kernels at shapes where the products of NT or the chunk index exceed 2^31: retention /
# RWKV-6 backward at K = 128, V = 256 (T = 2^20), the generalized delta rule (dplr_delta_rule) at K = V = 128.
_COMPILE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from zoo.kernels.chunk_pass import _chunk_pass_kernel
    from zoo.kernels.dplr_delta_rule.triton_chunk_parallel import _dplr_cp_pass_kernel

    def ttir(fn, ints, constexprs):
        sig = {name: ("i32" if name in ints else "constexpr" if name in constexprs else "*fp32") for name in fn.arg_names}
        return triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32)).asm["ttir"]

    print(ttir(_chunk_pass_kernel, {"NT"}, dict(V=256, KV=128 * 256, BLOCK=64, G=16, HAS_EDGE=False, REVERSE=True, H=1, IS_VARLEN=False)))
    print("=" * 20)
    print(ttir(_dplr_cp_pass_kernel, {"NT"}, dict(K=128, V=128, BK=128, BVP=16, KB=16, HAS_S0=True, H=1, IS_VARLEN=False)))
""")


def narrow_products(ttir: str) -> list[str]:
    """The i32 ``arith.muli`` lines of ``ttir`` with an operand derived from ``%NT`` (the chunk count), including
    the induction variables of loops bounded by it: products that scale with T and may wrap."""
    tainted = {"%NT"}
    found = []
    for line in ttir.splitlines():
        code = line.split(" loc(")[0]
        for_loop = re.match(r"\s*(?:%[\w.]+(?::\d+)?\s*=\s*)?scf\.for (%[\w.]+) = (.*)", code)
        if for_loop:
            if tainted & set(re.findall(r"%[\w.]+", for_loop.group(2).split("iter_args")[0])):  # the bounds
                tainted.add(for_loop.group(1))
            continue
        m = re.match(r"\s*(%[\w.]+)(?::\d+)?\s*=\s*([\w.]+)(.*)", code)
        if not m or not tainted & set(re.findall(r"%[\w.]+", m.group(3))):
            continue
        tainted.add(m.group(1))
        if m.group(2) == "arith.muli" and re.search(r":\s*(i32|tensor<[\dx]*xi32>)\s*$", code):
            found.append(code.strip())
    return found


def test_chunk_pass_offsets_are_int64():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    chunk_pass, dplr_pass = out.stdout.split("=" * 20)
    assert "tt.func" in chunk_pass and "tt.func" in dplr_pass
    assert narrow_products(chunk_pass) == []
    assert narrow_products(dplr_pass) == []


def test_narrow_products_finds_an_i32_product_of_the_chunk_count():
    ttir = textwrap.dedent("""
        %4 = arith.muli %NT, %c32768_i32 : i32 loc(#loc1)
        %5 = arith.muli %i_bh, %c2_i64 : i64 loc(#loc2)
        scf.for %c = %c0_i32 to %NT step %c1_i32  : i32 {
          %11 = arith.muli %c, %c16384_i32 : i32 loc(#loc3)
          %12 = arith.extsi %c : i32 to i64 loc(#loc4)
          %13 = arith.muli %12, %c16384_i64 : i64 loc(#loc5)
          %b_s_5 = scf.for %k0 = %c0_i32 to %c128_i32 step %c16_i32 iter_args(%b_s_6 = %12) -> (tensor<16xf32>) : i32 {
            %14 = arith.muli %k0, %c128_i32 : i32 loc(#loc6)
    """)
    assert narrow_products(ttir) == ["%4 = arith.muli %NT, %c32768_i32 : i32", "%11 = arith.muli %c, %c16384_i32 : i32"]


# ---------------------------------------------------------------- grid limits: B * H in grid y / z (meta tensors)

# the batched calls: a packed-document call takes batch 1 and T > 1001 (its documents), not these sizes
BATCHED = [c.name for c in TRITON_CALLS if not c.documents]


def _grid_yz_over_limit(call, dims: dict) -> bool:
    """Whether one of ``call``'s grid formulas puts more than 65,535 in axis y or z at ``dims`` (the tiles as large as
    can be, so only the batch x heads extent is left on its axis)."""
    huge = defaultdict(lambda: 1 << 40)
    return any(max(call.grid(k.name, dims, huge)[1:]) > MAX_GRID_YZ for k in call.launches)


def _batch(call, batch_heads: int) -> int:
    return batch_heads // call.op.smoke.get("H", 1)


@pytest.mark.parametrize("name", BATCHED)
def test_batch_times_heads_over_the_grid_limit_is_refused_before_launch(name):
    """At B * H = 65,536 an op whose grids put B * H in y or z raises a ValueError naming the op, B * H and the limit
    (no launch recorded); the others (selective scan and the SSD step put the batch in x) launch."""
    call = CALLS_BY_NAME[name]
    batch = _batch(call, MAX_GRID_YZ + 1)
    refused = _grid_yz_over_limit(call, {**call.op.smoke, "B": batch, "T": 16})
    assert refused == (call.op.name not in ("selective_scan",) and not call.step)
    if refused:
        with pytest.raises(ValueError, match=r"B \* H = 65,536 exceeds 65,535, CUDA's limit of the launch grid's y"):
            launches(call, call.op.smoke, 16, batch=batch)
    else:
        assert [r.kernel for r in launches(call, call.op.smoke, 16, batch=batch)] == [k.name for k in call.launches]


@pytest.mark.parametrize("name", BATCHED)
def test_batch_times_heads_at_the_grid_limit_launches(name):
    call = CALLS_BY_NAME[name]
    batch = _batch(call, MAX_GRID_YZ)
    recorded = launches(call, call.op.smoke, 16, batch=batch)
    assert [r.kernel for r in recorded] == [k.name for k in call.launches]
    assert max(max(r.grid[1:]) for r in recorded) <= MAX_GRID_YZ


# ---------------------------------------------------------------- device guard: launches under the inputs' device

def test_device_guard_enters_the_tensors_cuda_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def cuda_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", cuda_device)
    with triton_common.device_guard(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    with triton_common.device_guard(torch.device("cpu")), triton_common.device_guard(torch.device("meta")):
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.parametrize("name", BATCHED)
def test_every_launch_runs_under_the_device_guard(name, monkeypatch):
    """Every launch of the call, forward and backward, happens inside :func:`device_guard` of the inputs' device."""
    call = CALLS_BY_NAME[name]
    guard, real_launch = triton_common.device_guard, registry.Launch
    inside: list[torch.device] = []
    seen = []

    @contextlib.contextmanager
    def recording_guard(device):
        inside.append(device)
        with guard(device):
            yield
        inside.pop()

    def launch(*args):
        seen.append((args[0], list(inside)))
        return real_launch(*args)

    for info in pkgutil.walk_packages(zoo.kernels.__path__, "zoo.kernels."):  # the lazily imported ones too
        importlib.import_module(info.name)
    for module in [m for m in list(sys.modules.values()) if getattr(m, "device_guard", None) is guard]:
        monkeypatch.setattr(module, "device_guard", recording_guard)
    monkeypatch.setattr(registry, "Launch", launch)
    launches(call, call.op.smoke, 16)
    assert [k for k, _ in seen] == [k.name for k in call.launches]
    assert all(devices == [torch.device("meta")] for _, devices in seen), seen


# ---------------------------------------------------------------- tl.dot precision per target (ROCm)

class _HipDriver:
    """Triton's active driver for an AMD GPU that is not there: only its target."""

    def __init__(self, arch: str):
        self.arch = arch

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("hip", self.arch, 64)


@pytest.mark.parametrize("arch", ["gfx90a", "gfx942"])
def test_fp32_intermediates_get_tf32x3_on_nvidia_and_ieee_on_rocm(arch, monkeypatch):
    """ROCm's Triton refuses "tf32x3" (gfx942 takes plain "tf32", too coarse for fp32 states): "ieee" there."""
    from triton.runtime import driver

    monkeypatch.setattr(torch.version, "hip", "6.4")
    monkeypatch.setattr(driver, "_active", _HipDriver(arch))  # the stand-in as Triton's active driver
    target = triton_common.launch_target(torch.device("cuda", 0))
    monkeypatch.undo()
    assert target.arch == 0  # ROCm: the default tiles
    assert triton_common.dot_precision(torch.bfloat16, target) == "ieee"
    assert triton_common.dot_precision(torch.float32, target) == "ieee"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert triton_common.dot_precision(torch.float16, triton_common.launch_target(torch.device("cuda", 0))) == "tf32x3"


_COMPILE_HIP = textwrap.dedent("""
    import sys
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from zoo.kernels.dplr_delta_rule.triton_chunk_parallel import _dplr_cp_output_kernel as fn
    from zoo.kernels.triton_common import DEFAULT_TARGET, dot_precision

    precision = dot_precision(torch.bfloat16, DEFAULT_TARGET._replace(tf32=False))
    sig = {n: "i32" if n in ("T", "NT") else "constexpr" if n.isupper() else "*bf16" for n in fn.arg_names}
    sig.update(states="*fp32", o="*fp32")
    tiles = dict(H=4, K=64, V=64, BT=16, BK=64, BV=32, PRECISION=precision)
    triton.compile(ASTSource(fn, sig, constexprs=tiles), target=GPUTarget("hip", "gfx90a", 64))
    print(precision)
""")


def test_a_chunk_kernel_compiles_for_gfx90a_with_bf16_inputs():
    """The generalized delta rule's chunk-parallel output kernel (its dots take PRECISION) compiles for MI250 with the precision
    :func:`dot_precision` picks there; with tf32 Triton's AMD front end refuses it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_HIP], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ieee"]


# ---------------------------------------------------------------- Hopper: no transposed wgmma accumulator into a dot

# The two backward kernels with the pattern fla reports miscompiled by Triton 3.4 <= v < 3.7.1 on sm_90 (a tl.trans
# of a dot result fed to another dot), compiled for sm_90 with bf16 inputs at chunk length 64 and the tiles, operand
# dtype and precision their launchers choose for sm_90 (retention's BT = 32 there is not wgmma, so also BT = 64).
_COMPILE_SM90 = textwrap.dedent("""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from zoo.kernels.retention.triton_chunk_parallel import _retention_cp_grad_kernel, chunk_parallel_tiles
    from zoo.kernels.ssd.triton_ssd import _ssd_chunk_bwd_kernel, tiles
    from zoo.kernels.triton_common import Target, dot_precision, operand_dtype

    sm90 = Target(90)

    def ttgir(fn, bf16, ints, constexprs, warps):
        sig = {name: "i32" if name in ints else "constexpr" if name in constexprs else "*bf16" if name in bf16
               else "fp32" if name.startswith("dt_m") else "*fp32" for name in fn.arg_names}
        compiled = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=warps, num_stages=1))
        return compiled.asm["ttgir"]

    cp = chunk_parallel_tiles(64, 64, 64, torch.bfloat16, sm90)
    for bt, bv in ((cp.BT, cp.BV), (64, 32)):  # the launcher's tiles (mma.sync at BT = 32); BT = 64 makes them wgmma
        print(ttgir(_retention_cp_grad_kernel, {"q", "k", "v", "do"}, {"T", "NT", "B"},
                    dict(H=12, K=64, V=64, BT=bt, BK=cp.BK, BV=bv, PRECISION=dot_precision(torch.bfloat16, sm90),
                         OPERAND=operand_dtype(torch.bfloat16, sm90), IS_VARLEN=False), cp.grad_launch.num_warps))
        print("=" * 20)
    t = tiles(64, 64, 64, torch.bfloat16, sm90)
    print(ttgir(_ssd_chunk_bwd_kernel, {"x_ptr", "dt_ptr", "B_ptr", "C_ptr", "dy_ptr"}, {"T", "H", "G", "P", "n_chunks"},
                dict(N=64, HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, L=t.L, BLOCK_P=t.BWD_BLOCK_P,
                     BLOCK_N=t.BWD_BLOCK_N, PRECISION=t.PRECISION, OPERAND=t.OPERAND, IS_VARLEN=False),
                t.bwd_launch.num_warps))
""")


def transposed_accumulators(ttgir: str) -> list[str]:
    """The ``tt.trans`` lines of ``ttgir`` whose operand has an mma (accumulator) layout: a dot result transposed,
    which in these kernels is then an operand of another dot."""
    return [line.split(" loc(")[0].strip() for line in ttgir.splitlines()
            if re.search(r"= tt\.trans %[\w.]+ .*: tensor<[^>]*#mma\d*> ->", line)]


def test_no_transposed_wgmma_accumulator_feeds_a_dot_on_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    launcher_tiles, *wgmma = out.stdout.split("=" * 20)
    assert "tt.dot " in launcher_tiles and transposed_accumulators(launcher_tiles) == []
    for ttgir in wgmma:
        assert "ttng.warp_group_dot" in ttgir  # the dots are wgmma, where the miscompile is
        assert transposed_accumulators(ttgir) == []


def test_transposed_accumulators_finds_the_pattern():
    ttgir = textwrap.dedent("""
        %b_dk_199 = tt.trans %b_dA_198 {order = array<i32: 1, 0>} : tensor<64x64xf32, #mma> -> tensor<64x64xf32, #linear> loc(#loc1)
        %dB = tt.trans %dCB_211 {order = array<i32: 1, 0>} : tensor<64x64xf32, #mma1> -> tensor<64x64xf32, #linear> loc(#loc2)
        %k_t = tt.trans %b_k {order = array<i32: 1, 0>} : tensor<64x64xbf16, #blocked> -> tensor<64x64xbf16, #blocked1> loc(#loc3)
    """)
    assert len(transposed_accumulators(ttgir)) == 2
