"""The one-token step form of every op (the decode form its torch backend runs at T = 1) against the op's sequential
reference, in fp64 with odd sizes: outputs, states and gradients; a chain of steps equals the reference over T tokens;
the torch backends take the step at T = 1; the decode form of the depthwise causal conv is a dot over its window."""
import pytest
import torch
import torch.nn.functional as F

import zoo.kernels.retention as retention_op
import zoo.kernels.rwkv6 as rwkv6_op
import zoo.kernels.dplr_delta_rule as dplr_op
import zoo.kernels.selective_scan as scan_op
import zoo.kernels.ssd as ssd_op
from zoo.layers.ops import conv_window_step, causal_conv

F64 = torch.float64
BATCH, H, K, V = 3, 3, 5, 7  # odd sizes


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731


def ssd_inputs(T, seed=0, groups=3, rep=2):
    r = _gen(seed)
    heads = groups * rep
    return dict(x=r(BATCH, T, heads, K), dt=F.softplus(r(BATCH, T, heads)), A=-r(heads).abs() - 0.1, B=r(BATCH, T, groups, V),
                C=r(BATCH, T, groups, V), D=r(heads), initial_state=r(BATCH, heads, K, V))


def scan_inputs(T, seed=0):
    r = _gen(seed)
    return dict(u=r(BATCH, T, K), delta=r(BATCH, T, K), A=-r(K, V).abs() - 0.1, B=r(BATCH, T, V), C=r(BATCH, T, V), D=r(K),
                z=r(BATCH, T, K), delta_bias=r(K), initial_state=r(BATCH, K, V))


def retention_inputs(T, seed=0):
    r = _gen(seed)
    return dict(q=r(BATCH, T, H, K), k=r(BATCH, T, H, K), v=r(BATCH, T, H, V), log_decay=-r(H).abs() - 0.01,
                initial_state=r(BATCH, H, K, V))


def rwkv6_inputs(T, seed=0):
    r = _gen(seed)
    return dict(r=r(BATCH, T, H, K), k=r(BATCH, T, H, K), v=r(BATCH, T, H, V), w_log=-r(BATCH, T, H, K).exp(), u=r(H, K),
                initial_state=r(BATCH, H, K, V))


def rwkv7_inputs(T, seed=0):
    r = _gen(seed)
    kappa = F.normalize(r(BATCH, T, H, K), dim=-1)
    return dict(r=r(BATCH, T, H, K), w_log=-0.6 * torch.sigmoid(r(BATCH, T, H, K)), k=r(BATCH, T, H, K), v=r(BATCH, T, H, V),
                a=-kappa, b=kappa * torch.sigmoid(r(BATCH, T, H, K)), initial_state=r(BATCH, H, K, V))


# op name -> (inputs, step form, sequential reference, torch backend module, name of the step in that module,
#             per-token input names (time is dim 1), torch backend call on the inputs)
OPS = {
    "ssd": (ssd_inputs, ssd_op.ssd_step, ssd_op.ssd_naive, ssd_op, "ssd_step", ("x", "dt", "B", "C"),
            lambda i: ssd_op.ssd_scan(**{**i, "dt_softplus": False}, chunk_size=4)),
    "selective_scan": (scan_inputs, scan_op.selective_scan_step, scan_op.selective_scan_naive, scan_op, "selective_scan_step",
                       ("u", "delta", "B", "C", "z"), lambda i: scan_op.selective_scan(**i)),
    "retention": (retention_inputs, retention_op.retention_step, retention_op.retention_recurrent, retention_op, "retention_step",
                  ("q", "k", "v"), lambda i: retention_op.retention(**i, form="chunk", chunk_size=4)),
    "rwkv6": (rwkv6_inputs, rwkv6_op.rwkv6_step, rwkv6_op.rwkv6_naive, rwkv6_op, "rwkv6_step", ("r", "k", "v", "w_log"),
              lambda i: rwkv6_op.rwkv6(**i, chunk_size=4)),
    "dplr_delta_rule": (rwkv7_inputs, dplr_op.dplr_delta_rule_step, dplr_op.dplr_delta_rule_naive, dplr_op, "dplr_delta_rule_step",
                        ("r", "w_log", "k", "v", "a", "b"), lambda i: dplr_op.dplr_delta_rule(**i, chunk_size=4)),
}


def _loss(out):
    y, state = out
    return (y * torch.linspace(-1, 1, y.numel(), dtype=F64).view_as(y)).sum() + state.square().sum()


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "zeros"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_step_equals_reference_with_gradients(name, with_state):
    make, step, naive, *_ = OPS[name]
    inputs = make(1)
    if not with_state:
        inputs["initial_state"] = None
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}
    ref, out = naive(**inputs), step(**inputs)
    for a, b in zip(out, ref):
        assert a.dtype == b.dtype == F64 and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # From a zero state the decay has no effect: the step leaves it out of the graph (a zero gradient).
    grad = lambda o: torch.autograd.grad(_loss(o), list(leaves.values()), allow_unused=True, materialize_grads=True)  # noqa: E731
    for key, ga, gb in zip(leaves, grad(out), grad(ref)):
        torch.testing.assert_close(ga, gb, atol=1e-11, rtol=1e-11, msg=lambda m: f"{name}: grad of {key}: {m}")


@pytest.mark.parametrize("name", sorted(OPS))
def test_chained_steps_equal_reference_and_leave_the_state_alone(name):
    make, step, naive, _, _, timed, _ = OPS[name]
    T = 5
    inputs = make(T, seed=1)
    ref_y, ref_state = naive(**inputs)
    state, ys = inputs["initial_state"], []
    before = state.clone()
    for t in range(T):
        y, state = step(**{**inputs, **{k: inputs[k][:, t : t + 1] for k in timed}, "initial_state": state})
        ys.append(y)
    assert torch.equal(inputs["initial_state"], before)
    torch.testing.assert_close(torch.cat(ys, 1), ref_y, atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(state, ref_state, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("name", sorted(OPS))
def test_torch_backend_takes_the_step_at_one_token(name, monkeypatch):
    make, step, _, module, attr, _, call = OPS[name]
    calls = []
    monkeypatch.setattr(module, attr, lambda *a, **kw: calls.append(1) or step(*a, **kw))
    call(make(3))
    assert calls == []
    out = call(make(1))
    assert calls == [1]
    for a, b in zip(out, OPS[name][2](**make(1))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_window_step_equals_conv1d(bias):
    r = _gen(2)
    channels, taps = 7, 5
    window, weight = r(BATCH, channels, taps), r(channels, 1, taps)
    b = r(channels) if bias else None
    torch.testing.assert_close(conv_window_step(window, weight, b), F.conv1d(window, weight, b, groups=channels), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv_decodes_token_by_token_as_the_full_conv(bias):
    """One depthwise causal conv serves short conv, conv, Mamba and Mamba-2: the full call is Conv1d over the carried
    inputs followed by x, and token-by-token calls give the same outputs and the same final state."""
    r = _gen(3)
    channels, taps, T = 7, 4, 6
    conv = torch.nn.Conv1d(channels, channels, taps, groups=channels, bias=bias).double()
    x, prev = r(BATCH, channels, T), r(BATCH, channels, taps - 1)
    full, last = causal_conv(x, prev, conv.weight, conv.bias)
    with torch.no_grad():
        torch.testing.assert_close(full, conv(torch.cat((prev, x), -1)), atol=1e-12, rtol=1e-12)
    state, outs = prev, []
    for t in range(T):
        y, state = causal_conv(x[:, :, t : t + 1], state, conv.weight, conv.bias)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, -1), full, atol=1e-12, rtol=1e-12)
    assert torch.equal(state, last) and torch.equal(last, torch.cat((prev, x), -1)[:, :, -(taps - 1):])
