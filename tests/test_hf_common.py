"""transformers' own common model tests (``ModelTesterMixin``) run against zoo, as transformers runs them on its
models, for every registered block, every FFN and a hybrid configuration.

transformers' wheel ships no tests; its source distribution on PyPI ships ``tests/test_modeling_common.py`` and the
sibling ``*_common.py``/``*_mixin.py`` files. The first run downloads the installed version's sdist once (``pip
download``) into ``$ZOO_TRANSFORMERS_TESTS`` (default ``~/.cache/zoo/transformers-tests``) and imports
``ModelTesterMixin`` from it. When the sources cannot be fetched, a local run skips the module, saying why, and CI
(``CI=true``) fails; a test file that does not import fails everywhere. The two siblings the sdist
lacks (``exporters/test_export.py``, ``generation/test_utils.py``) are replaced by empty mixins: zoo's generation
behaviours are tested in ``test_hf_generation.py``.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
import unittest.mock
from pathlib import Path

import pytest
import torch
import transformers

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

import zoo  # noqa: F401  (registers the zoo model type)
from test_blocks import TEST_ARGS
from zoo.layers import FFNS, MIXERS
from zoo.modeling import ZooConfig, ZooForCausalLM, ZooModel

PACKAGE = "transformers_common_tests"


class FetchError(RuntimeError):
    """transformers' test sources could not be downloaded or are not in its source distribution."""


def common_tests_dir(version: str = transformers.__version__) -> Path:
    """The folder holding transformers ``version``'s top-level test files, downloaded on first use."""
    root = Path(os.environ.get("ZOO_TRANSFORMERS_TESTS", Path.home() / ".cache" / "zoo" / "transformers-tests"))
    target = root / version
    if (target / "test_modeling_common.py").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        download = Path(tmp) / "sdist"
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(download), f"transformers=={version}"]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as err:
            raise FetchError(f"pip download of the transformers=={version} sdist timed out") from err
        archives = list(download.glob("transformers-*.tar.gz"))
        if result.returncode or not archives:
            raise FetchError(f"pip download of the transformers=={version} sdist failed: {result.stderr.strip()[-500:]}")
        prefix = f"{archives[0].name[: -len('.tar.gz')]}/tests/"
        staging = Path(tmp) / "tests"
        staging.mkdir()
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = member.name[len(prefix):]
                if member.isfile() and member.name.startswith(prefix) and "/" not in name and name.endswith(".py"):
                    (staging / name).write_bytes(tar.extractfile(member).read())
        if not (staging / "test_modeling_common.py").exists():
            raise FetchError(f"the transformers=={version} sdist has no tests/test_modeling_common.py")
        staging.rename(target)
    return target


def import_common_tests() -> types.ModuleType:
    """``test_modeling_common`` of the installed transformers, with empty stand-ins for the two siblings the sdist lacks."""
    if f"{PACKAGE}.test_modeling_common" in sys.modules:
        return sys.modules[f"{PACKAGE}.test_modeling_common"]
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(common_tests_dir())]
    sys.modules[PACKAGE] = package
    for parent, child, mixin in [("exporters", "test_export", "ExportTesterMixin"), ("generation", "test_utils", "GenerationTesterMixin")]:
        sys.modules[f"{PACKAGE}.{parent}"] = types.ModuleType(f"{PACKAGE}.{parent}")
        stand_in = types.ModuleType(f"{PACKAGE}.{parent}.{child}")
        setattr(stand_in, mixin, type(mixin, (), {}))
        sys.modules[f"{PACKAGE}.{parent}.{child}"] = stand_in
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")


try:
    common = import_common_tests()
except FetchError as err:  # no network or no sdist: a local run skips, saying why; CI (CI=true) fails
    if os.environ.get("CI", "").lower() in ("", "0", "false"):
        pytest.skip(f"transformers {transformers.__version__}'s common model tests are unavailable: {err}", allow_module_level=True)
    raise

ModelTesterMixin = common.ModelTesterMixin
GenerationTesterMixin = sys.modules[f"{PACKAGE}.generation.test_utils"].GenerationTesterMixin
ids_tensor = common.ids_tensor


@pytest.fixture(scope="module", autouse=True)
def zoo_in_the_auto_mappings():
    """The mixin finds a model's role (base model, causal LM) by its class name in transformers' Auto mappings,
    where transformers' own models are listed; zoo's classes are registered at run time instead, so they are added
    for this module's tests."""
    names = [(MODEL_MAPPING_NAMES, "ZooModel"), (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "ZooForCausalLM")]
    for mapping, class_name in names:
        mapping["zoo"] = class_name
    yield
    for mapping, _ in names:
        del mapping["zoo"]


class ZooModelTester:
    """Tiny zoo configs shaped like transformers' model testers (batch 13, 7 tokens, 2 layers, d_model 32)."""

    def __init__(self, parent, blocks, ffn="swiglu", module_args=None, batch_size=13, seq_length=7, vocab_size=99):
        self.parent = parent
        self.blocks = blocks
        self.ffn = ffn
        self.module_args = module_args or {}
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.hidden_size = 32
        self.n_layers = self.num_hidden_layers = 2  # the tests compare num_hidden_layers with the outputs' counts
        self.num_attention_heads = 4
        self.num_attention_layers = self.get_config().layer_types.count("full_attention")
        self.is_training = True

    def get_config(self) -> ZooConfig:
        return ZooConfig(
            d_model=self.hidden_size, n_layers=self.n_layers, blocks=list(self.blocks), ffn=self.ffn,
            vocab_size=self.vocab_size, module_args=self.module_args, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        return self.get_config(), {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


# test_blocks' small sizes, with head sizes that divide d_model 32.
SIZES = {**TEST_ARGS, "rwkv6": {**TEST_ARGS["rwkv6"], "head_dim": 16}, "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32}}


def sized(blocks, ffn):
    return blocks, ffn, {name: SIZES[name] for name in (*blocks, ffn) if name in SIZES}


# Every block alone (SwiGLU FFN), every other FFN after attention, and a hybrid, by name: Zoo<Name>ModelTest.
CONFIGS = {
    **{name: sized([name], "swiglu") for name in MIXERS.names()},
    **{ffn: sized(["attention"], ffn) for ffn in FFNS.names() if ffn != "swiglu"},
    "hybrid": sized(["mamba2", "attention"], "swiglu"),
}


def make_test_class(name, blocks, ffn, module_args):
    class Test(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
        all_model_classes = (ZooModel, ZooForCausalLM)
        has_attentions = "attention" in blocks
        # The mixin dates a model by a "# Copyright 20xx" line in its config file, which zoo's lacks, and skips
        # test_can_init_all_missing_weights (``_init_weights`` covers every parameter) for models before 2023.
        test_can_init_all_missing_weights_before_2023 = True

        def setUp(self):
            self.model_tester = ZooModelTester(self, blocks, ffn, module_args)

        def test_attention_outputs(self):
            """The common test, counting the attention layers only (``config.layer_types``): a recurrent layer computes
            no attention map (as transformers' JambaModelTest.test_attention_outputs counts Jamba's attention layers)."""
            self.model_tester.num_hidden_layers = self.model_tester.num_attention_layers
            super().test_attention_outputs()

        def test_batching_equivalence(self):
            """The common test, without an MoE model's ``expert_load [n_moe_layers, E]``: the fraction of the batch's
            tokens routed to each expert is a statistic of the whole batch, which no row has on its own."""
            pop = ZooForCausalLM._pop_router_losses

            def without_expert_load(model, *args, **kwargs):
                stats = pop(model, *args, **kwargs)
                return stats if stats is None else {**stats, "expert_load": None}

            with unittest.mock.patch.object(ZooForCausalLM, "_pop_router_losses", without_expert_load):
                super().test_batching_equivalence()

    Test.__name__ = Test.__qualname__ = f"Zoo{name}ModelTest"
    return Test


for _name, (_blocks, _ffn, _args) in CONFIGS.items():
    _class_name = "".join(part.capitalize() for part in _name.split("_"))
    globals()[f"Zoo{_class_name}ModelTest"] = make_test_class(_class_name, _blocks, _ffn, _args)
