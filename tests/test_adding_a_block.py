"""Adding a block is a one-file change: ``tests/toy_block.py`` (a SequenceMixer and its registration, nothing else)
passes the block-contract tests, trains from a recipe, exports, loads with the Auto classes and generates, without
an edit anywhere else. Every block file in ``layers/`` is registered."""
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import zoo.layers
from zoo.layers import FFNS, MIXERS, SequenceMixer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]), "PYTHONUNBUFFERED": "1"}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def test_toy_block_passes_the_block_contract_tests(tmp_path):
    """test_blocks.py parametrizes over the registry: with the toy registered (a pytest plugin import) it runs on it."""
    proc = run([sys.executable, "-m", "pytest", "-q", "-p", "toy_block", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_blocks.py"), "-k", "toy_ema"], tmp_path)
    counts = proc.stdout.strip().splitlines()[-1]
    assert " passed" in counts and "failed" not in counts and int(counts.split()[0]) >= 9, counts


TRAIN_EXPORT_GENERATE = """
import sys
import toy_block  # the registration: the only thing zoo needs to know about the new block
import torch
import zoo
from transformers import AutoModelForCausalLM, AutoTokenizer
from zoo.train import main

assert main(sys.argv[1:]) == 0
model = AutoModelForCausalLM.from_pretrained("run/hf").eval()
assert type(model.model.layers[0].mixer).__name__ == "ToyEMA"
tok = AutoTokenizer.from_pretrained("run/hf")
ids = tok("def f(", return_tensors="pt")["input_ids"]
out = model.generate(ids, max_new_tokens=6, do_sample=False)
seq = ids
for _ in range(6):
    seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
assert torch.equal(out, seq), (out, seq)
print("generated", repr(tok.decode(out[0])))
"""


def test_toy_block_trains_from_a_recipe_exports_and_generates(tmp_path):
    overrides = [
        "recipe=transformer_small", "model.blocks=[toy_ema,attention]", "model.toy_ema.expand=2", "model.d_model=32",
        "model.n_layers=2", "data.seq_len=32", "data.batch_size=4", "data.val_batches=2", "trainer.max_steps=4",
        "trainer.val_every=4", "trainer.progress_bar=false", "output_dir=run",
    ]
    proc = run([sys.executable, "-c", TRAIN_EXPORT_GENERATE, *overrides], tmp_path)
    assert "generated 'def f(" in proc.stdout


def test_every_sequence_mixer_in_layers_is_registered():
    registered = {MIXERS.get(name).cls for name in MIXERS.names()} | {FFNS.get(name).cls for name in FFNS.names()}
    for module_info in pkgutil.iter_modules(zoo.layers.__path__):
        module = importlib.import_module(f"zoo.layers.{module_info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, SequenceMixer) and cls.__module__ == module.__name__ and not inspect.isabstract(cls) and not cls.wraps_blocks:
                assert cls in registered, f"{cls.__name__} in layers/{module_info.name}.py is a SequenceMixer but not registered (@MIXERS.register)"
