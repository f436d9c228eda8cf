import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run on CPU tensors only in the interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
