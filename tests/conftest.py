import os
import signal

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run on CPU tensors only in the interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _sigterm_handler_unchanged():
    """Every test leaves the process's SIGTERM handler as it found it: a flag-only handler left behind by an in-process
    training made a multiprocessing.Pool forked later ignore terminate() and hang the CI run."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    after = signal.getsignal(signal.SIGTERM)
    if after != before:
        signal.signal(signal.SIGTERM, before)
        pytest.fail(f"the test left SIGTERM handled by {after!r} (it was {before!r})")


def tiny_overrides(tmp_path, **extra) -> list[str]:
    """Recipe overrides that make any recipe train in seconds on CPU."""
    base = {
        "output_dir": str(tmp_path / "run"),
        "model.d_model": 32,
        "model.n_layers": 2,
        "data.seq_len": 32,
        "data.batch_size": 4,
        "data.val_batches": 2,
        "trainer.max_steps": 6,
        "trainer.val_every": 3,
        "trainer.log_every": 1,
        "trainer.progress_bar": False,
        "scheduler.warmup_steps": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def greedy_by_full_forward(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """``prompt`` extended by ``n`` tokens, each the argmax of a full forward over everything before it (no cache):
    what greedy ``generate`` must return."""
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


def prefill_then_decode_logits(model, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Logits ``[B, T - prefix, V]`` of ``ids[:, prefix:]`` fed one token at a time after a prefill of ``ids[:, :prefix]``."""
    from zoo.modeling import CACHE_FIELD, output_cache

    cache = output_cache(model(ids[:, :prefix], use_cache=True))
    steps = [model(ids[:, i : i + 1], use_cache=True, **{CACHE_FIELD: cache}).logits for i in range(prefix, ids.shape[1])]
    return torch.cat(steps, 1)
