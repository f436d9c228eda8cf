"""The chunk-parallel backward of the generalized delta rule (``dplr_delta_rule`` op,
kernels/dplr_delta_rule/triton_chunk_bwd.py).

:func:`chunked_bwd` is its algebra in plain torch (fp64, every step a tensor expression of the module docstring's
formulas): checked against autograd through ``naive.py`` first, so the Triton kernels below are checked against an
algebra already known right. Inputs come in the three parametrisations of the op: RWKV-7 (as layers/rwkv7.py calls
it), Gated DeltaNet and KDA (issue 27).
"""
import pytest
import torch
import torch.nn.functional as F

from zoo.kernels.dplr_delta_rule.naive import dplr_delta_rule_naive


def _chunks(x: torch.Tensor, BT: int) -> torch.Tensor:
    """``[B, T, H, n]`` -> ``[B, H, NT, BT, n]``, the last chunk zero-padded."""
    B, T, H = x.shape[:3]
    NT = -(-T // BT)
    return F.pad(x, (0, 0, 0, 0, 0, NT * BT - T)).view(B, NT, BT, H, -1).permute(0, 3, 1, 2, 4)


def _pair(x, y, ex, ey, mask):
    """``[..., t, j] = sum_k x_tk y_jk exp(ex_tk - ey_jk)`` where ``mask[t, j]``, else 0."""
    d = (ex[..., :, None, :] - ey[..., None, :, :]).masked_fill(~mask[..., None], -float("inf"))
    return (x[..., :, None, :] * y[..., None, :, :] * d.exp()).sum(-1)


def _weighted(W, x, ex, ey, mask):
    """``[..., t, k] = sum_j W[t, j] x_jk exp(ex_tk - ey_jk)`` where ``mask[t, j]``, else 0."""
    d = (ex[..., :, None, :] - ey[..., None, :, :]).masked_fill(~mask[..., None], -float("inf"))
    return (W[..., None] * x[..., None, :, :] * d.exp()).sum(-2)


def _rev_cumsum(x):
    return x.flip(-2).cumsum(-2).flip(-2)


def chunked_bwd(r, w_log, k, v, a, b, initial_state, do, ds_final, BT: int = 16):
    """Every gradient ``(dr, dw_log, dk, dv, da, db, d_initial_state)`` of ``sum(o * do) + sum(S_T * ds_final)``
    by the chunked backward (same dtype as the inputs; ``[B, T, H, K|V]``, ``[B, H, K, V]``)."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    r, w, k, v, a, b, do = (_chunks(x, BT) for x in (r, w_log, k, v, a, b, do))  # [B, H, NT, BT, n]
    NT = r.shape[2]
    A = w.cumsum(-2)
    Ae, AL = A - w, A[..., -1:, :]  # exclusive; the chunk total [B, H, NT, 1, K]
    t = torch.arange(BT)
    incl, strict = t[:, None] >= t[None, :], t[:, None] > t[None, :]
    Lab, Lak = _pair(a, b, Ae, A, strict), _pair(a, k, Ae, A, strict)
    Mrb, Mrk = _pair(r, b, A, A, incl), _pair(r, k, A, A, incl)
    X = torch.linalg.inv(torch.eye(BT, dtype=r.dtype) - Lab)
    P = X @ (a * Ae.exp())
    tail = (AL - A).exp()
    M = torch.diag_embed(AL.squeeze(-2).exp()) + (b * tail).transpose(-1, -2) @ P  # [B, H, NT, K, K]
    zeros = torch.zeros(B, H, K, V, dtype=r.dtype)
    S = [zeros if initial_state is None else initial_state]
    for c in range(NT):
        h = (b * tail)[:, :, c].mT @ X[:, :, c] @ Lak[:, :, c] @ v[:, :, c] + (k * tail)[:, :, c].mT @ v[:, :, c]
        S.append(M[:, :, c] @ S[-1] + h)
    S = torch.stack(S, 2)  # [B, H, NT + 1, K, V]
    G = (r * A.exp()).mT @ do + P.mT @ (Mrb.mT @ do)  # dS_c from the chunk's own outputs
    dS = [zeros if ds_final is None else ds_final]
    for c in reversed(range(NT)):
        dS.insert(0, M[:, :, c].mT @ dS[0] + G[:, :, c])
    dS = torch.stack(dS, 2)  # [B, H, NT + 1, K, V]
    Sc, Sn, dSn = S[:, :, :-1], S[:, :, 1:], dS[:, :, 1:]
    U = X @ ((a * Ae.exp()) @ Sc + Lak @ v)
    dU = X.mT @ ((b * tail) @ dSn + Mrb.mT @ do)
    dv = (k * tail) @ dSn + Mrk.mT @ do + Lak.mT @ dU
    Wu, Wv, Zu, Zv = do @ U.mT, do @ v.mT, dU @ U.mT, dU @ v.mT  # [.., BT, BT]
    dr = A.exp() * (do @ Sc.mT) + _weighted(Wu, b, A, A, incl) + _weighted(Wv, k, A, A, incl)
    da = Ae.exp() * (dU @ Sc.mT) + _weighted(Zu, b, Ae, A, strict) + _weighted(Zv, k, Ae, A, strict)
    dk = tail * (v @ dSn.mT) + _weighted(Wv.mT, r, -A, -A, incl.T) + _weighted(Zv.mT, a, -A, -Ae, strict.T)
    db = tail * (U @ dSn.mT) + _weighted(Wu.mT, r, -A, -A, incl.T) + _weighted(Zu.mT, a, -A, -Ae, strict.T)
    ad = a * da
    dw = _rev_cumsum(r * dr - b * db - k * dk) + _rev_cumsum(ad) - ad + (dSn * Sn).sum(-1)[..., None, :]

    def tokens(x):  # [B, H, NT, BT, n] -> [B, T, H, n]
        return x.permute(0, 2, 3, 1, 4).reshape(B, NT * BT, H, -1)[:, :T]

    return (*(tokens(x) for x in (dr, dw, dk, dv, da, db)), dS[:, :, 0])


# ---------------------------------------------------------------- the three parametrisations of the op


def rwkv7_params(B, T, H, K, V, decay_range=(-3.0, 1.0)):
    """layers/rwkv7.py: a = -kk, b = kk * alpha (kk unit-norm, alpha in (0, 1)), w_log = -exp(.)."""
    kk = F.normalize(torch.randn(B, T, H, K), dim=-1)
    return dict(r=torch.randn(B, T, H, K), w_log=-torch.exp(torch.empty(B, T, H, K).uniform_(*decay_range)),
                k=torch.randn(B, T, H, K) * K**-0.5, v=torch.randn(B, T, H, V), a=-kk, b=kk * torch.rand(B, T, H, K))


def gated_deltanet_params(B, T, H, K, V, decay_range=(-3.0, 1.0)):
    """``S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``: w_log = log alpha broadcast over K,
    a = k, b = -alpha beta k, the write beta k (k L2-normalised, beta in (0, 1))."""
    k = F.normalize(torch.randn(B, T, H, K), dim=-1)
    log_alpha = -torch.exp(torch.empty(B, T, H, 1).uniform_(*decay_range))
    beta = torch.rand(B, T, H, 1)
    return dict(r=F.normalize(torch.randn(B, T, H, K), dim=-1), w_log=log_alpha.expand(B, T, H, K), k=beta * k,
                v=torch.randn(B, T, H, V), a=k, b=-log_alpha.exp() * beta * k)


def kda_params(B, T, H, K, V, decay_range=(-3.0, 1.0)):
    """``S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T``: w_log = log alpha per channel,
    a = alpha * k, b = -beta k, the write beta k."""
    k = F.normalize(torch.randn(B, T, H, K), dim=-1)
    log_alpha = -torch.exp(torch.empty(B, T, H, K).uniform_(*decay_range))
    beta = torch.rand(B, T, H, 1)
    return dict(r=F.normalize(torch.randn(B, T, H, K), dim=-1), w_log=log_alpha, k=beta * k,
                v=torch.randn(B, T, H, V), a=log_alpha.exp() * k, b=-beta * k)


PARAMS = {"rwkv7": rwkv7_params, "gated_deltanet": gated_deltanet_params, "kda": kda_params}


def make_inputs(kind, B=1, T=17, H=2, K=24, V=40, initial_state=True, seed=0, **decays):
    """The op's inputs (fp32 leaves, ``w_log`` made its own tensor) and fixed cotangents ``do``, ``ds_final``."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    inputs = {n: x.contiguous() for n, x in PARAMS[kind](B, T, H, K, V, **decays).items()}
    inputs["initial_state"] = torch.randn(B, H, K, V) if initial_state else None
    cot = dict(do=torch.randn(B, T, H, V), ds_final=torch.randn(B, H, K, V))
    torch.random.set_rng_state(gen_state)
    return inputs, cot


def naive_grads(inputs: dict, cot: dict, ds_final: bool = True):
    """fp64 autograd through naive.py: ``(o, final_state, {name: gradient})``."""
    leaves = {n: x.double().requires_grad_() for n, x in inputs.items() if x is not None}
    o, s = dplr_delta_rule_naive(**{**{n: None for n in inputs}, **leaves})
    loss = (o * cot["do"].double()).sum() + ((s * cot["ds_final"].double()).sum() if ds_final else 0.0)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o, s, dict(zip(leaves, grads))


@pytest.mark.parametrize("kind", PARAMS)
@pytest.mark.parametrize("T,K,V,initial_state", [(1, 8, 8, True), (15, 24, 40, True), (17, 24, 40, False), (33, 16, 24, True)])
def test_chunked_bwd_matches_autograd(kind, T, K, V, initial_state):
    """The algebra: every gradient of the chunked backward equals autograd through naive.py in fp64 (1e-12)."""
    inputs, cot = make_inputs(kind, B=2, T=T, K=K, V=V, initial_state=initial_state)
    _, _, ref = naive_grads(inputs, cot)
    d = {n: x.double() if x is not None else None for n, x in inputs.items()}
    got = chunked_bwd(**d, do=cot["do"].double(), ds_final=cot["ds_final"].double())
    names = ["r", "w_log", "k", "v", "a", "b", "initial_state"]
    for name, g in zip(names, got, strict=True):
        if name in ref:
            err = (g - ref[name]).abs().max() / ref[name].abs().max()
            assert err < 1e-12, f"d{name}: {err:.3g}"


# ---------------------------------------------------------------- the Triton kernels (the interpreter on CPU)

triton = pytest.importorskip("triton")

from triton_testing import DEVICE, require_interpreter  # noqa: E402
from zoo.kernels.dplr_delta_rule import dplr_delta_rule  # noqa: E402
from zoo.kernels.dplr_delta_rule import triton_chunk_bwd as cpb  # noqa: E402
from zoo.kernels.dplr_delta_rule import triton_chunk_parallel as cp  # noqa: E402
from zoo.kernels.triton_common import DEFAULT_TARGET, Target  # noqa: E402

require_interpreter(cpb._dplr_cpb_grad_kernel)

# max |error| / max |reference| per input dtype (gradients come back in the input dtype)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
NAMES = ("r", "w_log", "k", "v", "a", "b", "initial_state")


def check(inputs: dict, cot: dict, dtype=torch.float32, loss: str = "both"):
    """``backend="triton_chunk"`` in ``dtype`` vs fp64 autograd through naive.py on the same rounded values, for the
    loss ``sum(o * do)`` (``"o"``), ``sum(S_T * ds_final)`` (``"state"``) or both."""
    low = {n: None if x is None else x.to(DEVICE, dtype) for n, x in inputs.items()}
    cot = {"do": cot["do"] * (loss != "state"), "ds_final": cot["ds_final"] * (loss != "o")}
    leaves = {n: x.clone().requires_grad_() for n, x in low.items() if x is not None}
    o, s = dplr_delta_rule(**{**low, **leaves}, backend="triton_chunk")
    ((o.double() * cot["do"].to(o.device)).sum() + (s.double() * cot["ds_final"].to(o.device)).sum()).backward()
    o_ref, s_ref, ref = naive_grads({n: None if x is None else x.cpu() for n, x in low.items()}, cot)
    tol = TOLERANCE[dtype]
    for name, got, want in [("o", o, o_ref), ("final state", s, s_ref)] + [(n, leaves[n].grad, ref[n]) for n in ref]:
        assert got is not None and got.shape == want.shape, name
        err = (got.cpu().double() - want).abs().max().item()
        scale = want.abs().max().clamp_min(1e-6).item()
        assert err <= tol * scale, f"{name} ({dtype}, loss {loss}): max error {err:.3g} vs scale {scale:.3g}"
    for name, x in leaves.items():
        assert x.grad.dtype == dtype, name


# (kind, T, K, V, initial state): T = 1 / 15 / 17 / 33 end in, inside, just past and past two chunks of 16;
# K = 24 / 40 and V = 40 / 24 are not powers of two (V = 40: two 32-wide blocks, the second partial)
SHAPES = [("rwkv7", 1, 24, 40, True), ("gated_deltanet", 15, 24, 40, True), ("kda", 17, 40, 24, True),
          ("rwkv7", 33, 16, 24, False)]


@pytest.mark.parametrize("kind,T,K,V,initial_state", SHAPES)
def test_fp32_every_gradient_matches_naive(kind, T, K, V, initial_state):
    check(*make_inputs(kind, T=T, K=K, V=V, initial_state=initial_state))


@pytest.mark.parametrize("loss", ["o", "state"])
def test_gradient_from_the_outputs_or_the_final_state_alone(loss):
    """Only ``o`` (the final state's gradient zero) or only the final state (``do`` zero: every gradient flows
    through the reverse pass from ``dS_NT``)."""
    check(*make_inputs("kda", T=20, K=16, V=24), loss=loss)


@pytest.mark.parametrize("kind,dtype", [("rwkv7", torch.bfloat16), ("gated_deltanet", torch.float16), ("kda", torch.bfloat16)])
def test_half_precision_matches_naive(kind, dtype):
    check(*make_inputs(kind, T=17, K=24, V=40), dtype)


@pytest.mark.parametrize("kind", ["rwkv7", "gated_deltanet", "kda"])
def test_decays_near_zero_and_one(kind):
    """w_log from -e^4 (decay ~1e-24) to -e^-6 (decay ~0.9975): every exponent is later-minus-earlier, masked before
    ``exp``, so nothing overflows and every gradient still matches."""
    check(*make_inputs(kind, T=20, K=16, V=16, decay_range=(-6.0, 4.0)))


def test_non_contiguous_inputs():
    """Transposed ``[B, T, H, *]`` inputs (B = 2) and a transposed initial state."""
    inputs, cot = make_inputs("gated_deltanet", B=2, T=18, K=16, V=24)
    for name, x in inputs.items():
        inputs[name] = x.transpose(1, 2).contiguous().transpose(1, 2)
        assert not inputs[name].is_contiguous()
    check(inputs, cot)


def test_launcher_without_a_final_state_gradient_equals_the_algebra():
    """:func:`dplr_cp_bwd` called with ``ds_final=None`` (its zeros branch) from the forward's saved buffers equals
    :func:`chunked_bwd` with a zero final-state gradient."""
    inputs, cot = make_inputs("rwkv7", T=19, K=24, V=40)
    x = {n: t.to(DEVICE) for n, t in inputs.items()}
    _, _, states, trans, table = cp.dplr_cp_fwd(*x.values(), 16)
    assert table is None  # no packed documents
    args = [x[n] for n in NAMES[:-1]]
    got = cpb.dplr_cp_bwd(*args, cot["do"].to(DEVICE), None, states, trans, table, 16)
    d = {n: t.double() for n, t in inputs.items()}
    want = chunked_bwd(**d, do=cot["do"].double(), ds_final=None)
    for name, g, ref in zip(NAMES, got, want, strict=True):
        err = (g.cpu().double() - ref).abs().max() / ref.abs().max()
        assert err < 2e-5, f"d{name}: {err:.3g}"


def test_tiles_are_the_forwards():
    """The backward reads the forward's chunk states: its BT, BK, BV, BVP and KB are the forward's everywhere."""
    for K, V in [(8, 8), (24, 40), (64, 64), (128, 128)]:
        for dtype in (torch.float32, torch.bfloat16):
            for target in (DEFAULT_TARGET, Target(80), Target(90)):
                fwd = cp.dplr_chunk_parallel_tiles(K, V, 16, dtype, target)
                bwd = cpb.dplr_chunk_bwd_tiles(K, V, 16, dtype, target)
                assert bwd[:5] == fwd[:5] and bwd.pass_launch == fwd.pass_launch
