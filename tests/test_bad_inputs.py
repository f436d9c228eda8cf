"""Every bad input is refused the way the README promises: exit code 2, ``PROG: error: <key path>: <what and why>`` on
stderr, no traceback, and nothing written to or deleted from the output directory.

The recipe rows come from the schema itself (:class:`zoo.config.Recipe`, every registered block's and FFN's config
class, the synthetic task section): every ``Literal`` key gets a value outside it, every bounded number a value at
each bound, every key a value of the wrong kind. Keys that take free text (paths, names) also need a row in
:data:`SEMANTIC` or a reason in :data:`FREE_TEXT`; ``test_every_recipe_key_has_a_row`` fails for a new key without
one. The commands (zoo.train, zoo.generate, zoo.convert, zoo.ablate, zoo.merge, zoo.eval) run in-process through their
``main(argv)``; a few rows run as subprocesses. Fine-tuning is a recipe section (``finetune:``) of zoo.train.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal

import pytest
import torch
import yaml

from zoo import ablate, generate, merge, train
from zoo import eval as zoo_eval
from zoo.config import ModelConfig, Recipe, ShortConvSetting
from zoo.convert import __main__ as convert
from zoo.errors import ZooError
from zoo.layers import FFNS, MIXERS
from zoo.recipe_loader import load_recipe

# ----------------------------------------------------------------------------------------------------------------
# The schema's keys
# ----------------------------------------------------------------------------------------------------------------


def _union_args(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _walk(cls: type, prefix: str, out: dict[str, tuple[Any, dataclasses.Field]]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        path = f"{prefix}.{f.name}" if prefix else f.name
        if cls is Recipe and f.name == "model":
            _walk_model(out)
            continue
        sections = [a for a in _union_args(hints[f.name]) if dataclasses.is_dataclass(a)]
        if sections:
            _walk(sections[0], path, out)
        else:
            out[path] = (hints[f.name], f)


def _walk_model(out: dict[str, tuple[Any, dataclasses.Field]]) -> None:
    hints = typing.get_type_hints(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        if f.name not in ("module_args", "short_conv"):
            out[f"model.{f.name}"] = (hints[f.name], f)
    (short_conv,) = dataclasses.fields(ShortConvSetting)
    for registry in (MIXERS, FFNS):
        for name in registry.names():
            _walk(registry.get(name).config_cls, f"model.{name}", out)
            if registry is MIXERS:
                out[f"model.{name}.short_conv"] = (int, short_conv)


def recipe_keys() -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every leaf key a recipe takes: ``key path -> (type hint, dataclass field)``."""
    out: dict[str, tuple[Any, dataclasses.Field]] = {}
    _walk(Recipe, "", out)
    return out


def _literals(hint: Any) -> tuple[list, bool]:
    """The Literal choices in ``hint`` and whether they sit inside a list (``list[Literal[...]]``)."""
    for arg in _union_args(hint):
        if typing.get_origin(arg) is Literal:
            return list(typing.get_args(arg)), False
        if typing.get_origin(arg) is list and typing.get_origin(typing.get_args(arg)[0]) is Literal:
            return list(typing.get_args(typing.get_args(arg)[0])), True
    return [], False


def _takes_text(hint: Any) -> bool:
    return any(a is str or typing.get_origin(a) is list and typing.get_args(a)[0] is str for a in _union_args(hint))


def _number(hint: Any) -> type:
    return int if int in _union_args(hint) else float


def schema_rows() -> list[tuple[str, str]]:
    """``(key, bad value)`` rows generated from the schema: wrong kind, outside a Literal, at each bound."""
    rows = []
    for key, (hint, f) in recipe_keys().items():
        rows.append((key, "{bad: 1}"))
        if (int in _union_args(hint) or float in _union_args(hint)) and not _takes_text(hint):
            rows.append((key, "not_a_number"))
        choices, in_list = _literals(hint)
        if choices:
            rows.append((key, "[not_a_choice]" if in_list else "not_a_choice"))
        bounds = f.metadata.get("bounds") or {}
        kind = _number(hint)
        step = 1 if kind is int else 0.5
        for name, bad in (("gt", 0), ("ge", -step), ("lt", 0), ("le", step)):
            if bounds.get(name) is not None:
                rows.append((key, repr(kind(bounds[name]) + bad)))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Inputs of the wrong kind
# ----------------------------------------------------------------------------------------------------------------

TINY = {"model.d_model": 32, "model.n_layers": 2, "model.attention.n_heads": 2, "model.attention.n_kv_heads": 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good and bad inputs shared by the rows (nothing here is ever an output directory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from peft import get_peft_model

    from zoo.data import byte_tokenizer
    from zoo.finetune import peft_lora_config
    from zoo.modeling import ZooConfig, ZooForCausalLM
    from zoo.training import export_hf

    root = tmp_path_factory.mktemp("inputs")
    made = {"root": root}
    corpus = made["corpus"] = root / "corpus"
    corpus.mkdir()
    for i in range(16):
        (corpus / f"doc{i}.txt").write_text(f"document {i}\n" + "some words of text\n" * 50)
    made.update(empty_dir=root / "empty", text_file=root / "notes.txt", corrupt_tokenizer=root / "tokenizer.json", parquet=root / "rows.parquet")
    made["empty_dir"].mkdir()
    made["text_file"].write_text("plain text, not a tokenizer, checkpoint or config\n")
    made["corrupt_tokenizer"].write_text('{"version": "1.0", "truncation": null,')
    pq.write_table(pa.table({"body": ["a row"] * 20}), made["parquet"])

    def zoo_dir(name: str, recipe: str, **extra) -> tuple[Path, dict]:
        spec = load_recipe(recipe, [f"{k}={v}" for k, v in {**TINY, **extra}.items() if recipe == "transformer_small" or "attention" not in k])
        spec = spec.with_vocab_size(259)
        tok = byte_tokenizer()
        torch.manual_seed(0)
        model = ZooForCausalLM(ZooConfig.from_model_config(spec.model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        run = root / name
        export_hf(model, tok, run / "hf")
        (run / "recipe.yaml").write_text(spec.to_yaml())
        return run, spec.to_dict()

    made["run"], transformer = zoo_dir("transformer_run", "transformer_small")
    made["hf"] = made["run"] / "hf"
    made["mamba_hf"] = zoo_dir("mamba_run", "mamba_small")[0] / "hf"
    made["wide_hf"] = zoo_dir("wide_run", "transformer_small", **{"model.d_model": 48})[0] / "hf"
    for model_type in ("llama", "gla"):
        made[model_type] = root / model_type
        made[model_type].mkdir()
        (made[model_type] / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 32}))

    def edited(name: str, edit: Callable[[dict], None] | None, text: str | None = None) -> Path:
        directory = root / name
        directory.mkdir()
        for file in made["hf"].iterdir():
            (directory / file.name).write_bytes(file.read_bytes())
        config = json.loads((directory / "config.json").read_text())
        if edit is not None:
            edit(config)
        (directory / "config.json").write_text(text if text is not None else json.dumps(config))
        return directory

    made["config_no_d_model"] = edited("no_d_model", lambda c: c.pop("d_model"))
    made["config_bad_d_model"] = edited("bad_d_model", lambda c: c.update(d_model="big"))
    made["config_other_d_model"] = edited("other_d_model", lambda c: c.update(d_model=64))
    made["config_bad_block"] = edited("bad_block", lambda c: c.update(blocks=["nope"]))
    made["config_corrupt"] = edited("corrupt_config", None, text="{not json")
    made["bad_safetensors"] = edited("bad_safetensors", None, text=(made["hf"] / "config.json").read_text())
    (made["bad_safetensors"] / "model.safetensors").write_bytes(b"\x00" * 64)

    # Lightning checkpoints: one keeping its recipe, one of the days before (its run's recipe.yaml beside ckpt/)
    (made["run"] / "ckpt").mkdir()
    made["ckpt"] = made["run"] / "ckpt" / "step-0000003.ckpt"
    torch.save({"state_dict": {}, "global_step": 3, "zoo_recipe": transformer}, made["ckpt"])
    legacy = root / "legacy_run"
    (legacy / "ckpt").mkdir(parents=True)
    (legacy / "recipe.yaml").write_text(yaml.safe_dump(transformer))
    made["legacy_ckpt"] = legacy / "ckpt" / "step-0000003.ckpt"
    torch.save({"state_dict": {}, "global_step": 3}, made["legacy_ckpt"])

    # A LoRA adapter of the transformer, in its run directory (with the run's recipe.yaml) and moved out of it
    base = ZooForCausalLM.from_pretrained(made["hf"])
    peft_model = get_peft_model(base, peft_lora_config(load_recipe("lora_small", ["finetune.init_from=x"]).finetune.lora, base))
    made["adapter"] = made["run"] / "adapter"
    peft_model.save_pretrained(made["adapter"], safe_serialization=True)
    made["moved_adapter"] = root / "moved_adapter"
    peft_model.save_pretrained(made["moved_adapter"], safe_serialization=True)
    return made


# ----------------------------------------------------------------------------------------------------------------
# Running a row
# ----------------------------------------------------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, tuple[int, int]] | None:
    """Every file under ``directory`` with its size and mtime; None when it does not exist."""
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.rglob("*"))}


def assert_refused(capsys, main: Callable[[list[str]], int], argv: list[str], key: str, watched: list[Path]) -> str:
    before = [snapshot(w) for w in watched]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code} for {argv}\n{err}"
    assert "Traceback" not in err, err
    assert ": error: " in err and key in err.split(": error: ", 1)[1], f"{key!r} not named in:\n{err}"
    assert [snapshot(w) for w in watched] == before, f"{argv} wrote to or deleted from {watched}"
    return err


def train_argv(recipe: str, files: dict[str, Path], out: Path, *overrides: str) -> list[str]:
    base = [f"data.source={files['corpus']}", "data.val_fraction=0.25", f"data.cache_dir={files['root'] / 'cache'}", f"output_dir={out}"]
    return [f"recipe={recipe}", *base, *overrides]


# ----------------------------------------------------------------------------------------------------------------
# Recipe keys (zoo.train; zoo.ablate shares the loader and gets rows of its own below)
# ----------------------------------------------------------------------------------------------------------------

# Keys that take free text (paths, names): what a wrong value is, per key. ``{name}`` is a path from ``files``.
SEMANTIC: dict[str, list[list[str]]] = {
    "data.packing": [["recipe=mqar_small", "data.source=mqar", "data.packing=documents"], ["data.packing=documents", "trainer.compile=true"]],
    "output_dir": [["output_dir={text_file}"]],
    "resume": [
        ["resume={root}/missing.ckpt"],
        ["resume={text_file}"],  # not a checkpoint
        ["resume={hf}/model.safetensors"],  # weights, not a Lightning checkpoint
        ["recipe=mamba_small", "resume={ckpt}"],  # a transformer's checkpoint for a Mamba run
        ["recipe=mamba_small", "resume={legacy_ckpt}"],  # the same, from before checkpoints kept their recipe
        ["model.d_model=48", "resume={ckpt}"],
    ],
    "data.source": [["data.source={root}/missing"], ["data.source={empty_dir}"], ["data.source=no such glob/*.txt"]],
    "data.text_field": [["data.source={parquet}"]],
    "data.tokenizer": [
        ["data.tokenizer={corrupt_tokenizer}"],
        ["data.tokenizer={empty_dir}"],
        ["data.tokenizer={parquet}"],
        ["data.tokenizer={root}/missing.json"],
        ["data.tokenizer=/no/such/dir"],
        ["data.tokenizer={text_file}"],
    ],
    "data.cache_dir": [["data.cache_dir={text_file}"]],
    "trainer.precision": [["trainer.precision=fp8"], ["trainer.precision=bf16-fast"]],
    "trainer.accelerator": [["trainer.accelerator=quantum"]],
    "trainer.strategy": [["trainer.strategy=nope"]],
    "trainer.devices": [["trainer.devices=0"], ["trainer.devices=some"]],
    "trainer.activation_checkpointing": [["trainer.activation_checkpointing=[nope]"], ["trainer.activation_checkpointing=[lstm]"]],
    "model.blocks": [["model.blocks=[nope]"], ["model.blocks=[]"], ["model.n_layers=3", "model.blocks=[attention,lstm]"]],
    "model.ffn": [["model.ffn=nope"], ["model.ffn=[swiglu,nope]"]],
    "model.norm": [["model.norm=nope"]],
    "model.attention.qk_norm": [["model.attention.qk_norm=nope"]],
    "model.vocab_size": [["model.vocab_size=100"]],  # fewer ids than the byte tokenizer's 259
    "finetune.init_from": [
        ["finetune.init_from={root}/missing"],
        ["finetune.init_from={empty_dir}"],
        ["finetune.init_from={llama}"],
        ["finetune.init_from={mamba_hf}"],  # a Mamba base for a transformer recipe
        ["finetune.init_from={wide_hf}"],
    ],
    "finetune.lora.target_modules": [["finetune.init_from={hf}", "finetune.lora.target_modules=[nope]"]],
    "finetune.lora.target_parameters": [
        ["finetune.init_from={hf}", "finetune.lora.target_modules=[]", "finetune.lora.target_parameters=[ffn.nope]"],
    ],
    **{f"model.{name}.backend": [[f"model.{name}.backend=nope"]] for name in MIXERS.names() if f"model.{name}.backend" in recipe_keys()},
}
# Free-text keys without a semantic row, and why none is needed.
FREE_TEXT = {
    "name": "a label: any text names the run (output_dir defaults to checkpoints/<name>)",
    "finetune.lora.exclude_modules": "suffixes that match no module are dropped on purpose (see peft_lora_config)",
}
# The key path a semantic row's error names, where it is not the row's own key.
NAMED_KEY = {("finetune.init_from", 3): "model.", ("finetune.init_from", 4): "model.d_model"}


def semantic_rows() -> list[tuple[str, int, list[str]]]:
    return [(key, i, overrides) for key, rows in SEMANTIC.items() for i, overrides in enumerate(rows)]


def test_every_recipe_key_has_a_row():
    keys = recipe_keys()
    rows = {key for key, _ in schema_rows()}
    assert set(keys) == rows
    text_keys = {key for key, (hint, _) in keys.items() if _takes_text(hint)}
    missing = sorted(text_keys - set(SEMANTIC) - set(FREE_TEXT))
    assert not missing, f"free-text keys without a row in SEMANTIC or a reason in FREE_TEXT: {missing}"
    assert not (set(SEMANTIC) | set(FREE_TEXT)) - set(keys), "rows for keys the schema no longer has"
    # every block and FFN in the registries has its section
    assert {k.split(".")[1] for k in keys if k.count(".") == 2 and k.startswith("model.")} >= set(MIXERS.names()) | set(FFNS.names())


@pytest.mark.parametrize(("key", "value"), schema_rows(), ids=lambda v: str(v))
def test_recipe_key_refused(capsys, tmp_path, files, key, value):
    out = tmp_path / "run"
    recipe = "mqar_small" if key.startswith("data.task.") else "transformer_small"
    assert_refused(capsys, train.main, train_argv(recipe, files, out, f"{key}={value}"), key, [out])


@pytest.mark.parametrize(("key", "index", "overrides"), semantic_rows(), ids=lambda v: str(v))
def test_recipe_key_semantics_refused(capsys, tmp_path, files, key, index, overrides):
    out = tmp_path / "run"
    settings = [s.format(**{k: str(v) for k, v in files.items()}) for s in overrides]
    recipe = next((s.split("=", 1)[1] for s in settings if s.startswith("recipe=")), "transformer_small")
    settings = [s for s in settings if not s.startswith("recipe=")]
    if key.startswith("finetune."):
        settings = [*(f"{k}={v}" for k, v in TINY.items()), *settings]
    named = NAMED_KEY.get((key, index), key)
    err = assert_refused(capsys, train.main, train_argv(recipe, files, out, *settings), named, [out, files["run"]])
    assert len([line for line in err.splitlines() if ": error: " in line]) == 1, err


def test_resume_names_every_differing_key(capsys, tmp_path, files):
    err = assert_refused(capsys, train.main, train_argv("mamba_small", files, tmp_path / "run", f"resume={files['ckpt']}"), "resume", [tmp_path])
    for key in ("model.blocks", "model.n_layers", "model.ffn", "model.mamba"):
        assert key in err


def test_resume_auto_of_another_model_deletes_nothing(capsys, tmp_path, files):
    """resume=auto in a run directory whose checkpoint is another model's: refused, metrics.csv and ckpt/ untouched."""
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    (run / "ckpt" / files["ckpt"].name).write_bytes(files["ckpt"].read_bytes())
    (run / "metrics.csv").write_text("step,train_loss\n1,5.0\n")
    argv = train_argv("mamba_small", files, run, "resume=auto")
    assert_refused(capsys, train.main, argv, "resume", [run])


def test_checkpoints_keep_their_resolved_recipe(tmp_path, files):
    from zoo.reliability.resume import RECIPE_KEY
    from zoo.training import ZooLightningModule

    recipe = load_recipe("transformer_small", [f"{k}={v}" for k, v in TINY.items()]).with_vocab_size(259)
    checkpoint: dict = {}
    ZooLightningModule(recipe).on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "c.ckpt")
    assert torch.load(tmp_path / "c.ckpt", weights_only=True)[RECIPE_KEY] == recipe.to_dict()


# ----------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------

# (command, argv with {name} paths from ``files`` and {out} the watched output, key path the error must name)
COMMAND_ROWS: list[tuple[str, list[str], str]] = [
    ("train", [], "no recipe given"),
    ("train", ["recipe=nope"], "recipe"),
    ("train", ["recipe=transformer_small", "model.nope=1"], "model.nope"),
    ("train", ["recipe=transformer_small", "=1"], "=1"),
    ("train", ["recipe=transformer_small", "model.d_model"], "model.d_model"),
    ("train", ["recipe={text_file}"], "recipe"),
    ("train", ["recipe=transformer_small", "--nope"], "--nope"),
    ("ablate", ["recipe=transformer_small"], "no blocks given"),
    ("ablate", ["recipe=transformer_small", "blocks=[nope]"], "blocks[0]"),
    ("ablate", ["recipe=transformer_small", "blocks=[lstm]", "--lrs", "fast"], "--lrs"),
    ("ablate", ["recipe=transformer_small", "blocks=[lstm]", "--lrs", "-1"], "--lrs"),
    ("ablate", ["recipe=transformer_small", "blocks=[lstm]", "--params", "many"], "--params"),
    ("ablate", ["recipe=transformer_small", "blocks=[lstm]", "output_dir={out}", "trainer.precision=fp8"], "trainer.precision"),
    ("ablate", ["recipe=transformer_small", "blocks=[lstm]", "output_dir={out}", "model.d_model=0"], "model.d_model"),
    ("generate", ["{root}/missing", "--prompt", "x"], "missing"),
    ("generate", ["{empty_dir}", "--prompt", "x"], "config.json"),
    ("generate", ["{adapter}", "--prompt", "x"], "config.json"),
    ("generate", ["{llama}", "--prompt", "x"], "config.model_type"),
    ("generate", ["{config_no_d_model}", "--prompt", "x"], "config.d_model"),
    ("generate", ["{config_bad_d_model}", "--prompt", "x"], "config.d_model"),
    ("generate", ["{config_other_d_model}", "--prompt", "x"], "config.json"),
    ("generate", ["{config_bad_block}", "--prompt", "x"], "config.blocks[0]"),
    ("generate", ["{config_corrupt}", "--prompt", "x"], "config.json"),
    ("generate", ["{bad_safetensors}", "--prompt", "x"], "model.safetensors"),
    ("generate", ["{hf}"], "--prompt"),
    ("generate", ["{hf}", "--prompt", "x", "--max-new-tokens", "-3"], "--max-new-tokens"),
    ("generate", ["{hf}", "--prompt", "x", "--temperature", "0"], "--temperature"),
    ("generate", ["{hf}", "--prompt", "x", "--top-p", "0"], "--top-p"),
    ("generate", ["{hf}", "--prompt", "x", "--top-k", "-1"], "--top-k"),
    ("generate", ["{hf}", "--prompt", "x", "--diffusion-steps", "0"], "--diffusion-steps"),
    ("generate", ["{hf}", "--prompt", "x", "--seed", "s"], "--seed"),
    ("convert", ["{root}/missing", "{out}"], "config.json"),
    ("convert", ["{empty_dir}", "{out}"], "config.json"),
    ("convert", ["{hf}", "{out}"], "model_type 'zoo'"),
    ("convert", ["{gla}", "{out}"], "model_type 'gla'"),
    ("convert", ["{config_corrupt}", "{out}"], "config.json"),
    ("convert", ["{llama}", "{text_file}"], "out_dir"),
    ("convert", ["{llama}"], "out_dir"),
    ("merge", ["--base", "{empty_dir}", "--adapter", "{adapter}", "--out", "{out}"], "--base"),
    ("merge", ["--base", "{hf}", "--adapter", "{hf}", "--out", "{out}"], "--adapter"),
    ("merge", ["--base", "{mamba_hf}", "--adapter", "{adapter}", "--out", "{out}"], "model.blocks"),
    ("merge", ["--base", "{wide_hf}", "--adapter", "{adapter}", "--out", "{out}"], "model.d_model"),
    ("merge", ["--base", "{wide_hf}", "--adapter", "{moved_adapter}", "--out", "{out}"], "--adapter"),
    ("merge", ["--base", "{config_bad_block}", "--adapter", "{adapter}", "--out", "{out}"], "config.blocks[0]"),
    ("merge", ["--base", "{hf}", "--adapter", "{adapter}"], "--out"),
    ("eval", ["{root}/missing", "--loss-by-position", "--max-length", "8"], "missing"),
    ("eval", ["{empty_dir}", "--loss-by-position", "--max-length", "8"], "config.json"),
    ("eval", ["{hf}"], "--loss-by-position"),
    ("eval", ["{hf}", "--loss-by-position"], "--max-length"),
    ("eval", ["{hf}", "--loss-by-position", "--max-length", "0"], "--max-length"),
    ("eval", ["{hf}", "--loss-by-position", "--max-length", "8", "--data", "{root}/missing.txt"], "--data"),
    ("eval", ["{hf}", "--tasks", "lambada_openai", "--bootstrap-iters", "-1"], "--bootstrap-iters"),
]
MAINS = {"train": train.main, "ablate": ablate.main, "generate": generate.main, "convert": convert.main, "merge": merge.main,
         "eval": zoo_eval.main}


@pytest.mark.parametrize(("command", "argv", "key"), COMMAND_ROWS, ids=lambda v: str(v))
def test_command_refused(capsys, tmp_path, files, command, argv, key):
    out = tmp_path / "out"
    argv = [a.format(out=out, **{k: str(v) for k, v in files.items()}) for a in argv]
    assert_refused(capsys, MAINS[command], argv, key, [out, files["run"]])


def test_every_command_has_rows():
    assert {command for command, _, _ in COMMAND_ROWS} == set(MAINS)


# Two of the inputs that ended in tracebacks, as a user runs them: separate processes (about 20 s each, mostly imports;
# the other two, data.tokenizer rows, run in-process above).
SUBPROCESS_ROWS = [
    (["zoo.train", "recipe=transformer_small", "trainer.precision=fp8"], "trainer.precision"),
    (["zoo.train", "recipe=mamba_small", "resume={ckpt}"], "resume"),
]


@pytest.mark.parametrize(("argv", "key"), SUBPROCESS_ROWS, ids=lambda v: str(v))
def test_refused_as_a_process(tmp_path, files, argv, key):
    out = tmp_path / "run"
    module, *rest = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", module, *rest, f"output_dir={out}", f"data.source={files['corpus']}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith(f"{module}: error: {key}: "), proc.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# The Python API
# ----------------------------------------------------------------------------------------------------------------

ZOO_CONFIG_ROWS = [
    ({"d_model": 0}, "config.d_model"),
    ({"d_model": "wide"}, "config.d_model"),
    ({"n_layers": 3, "blocks": ["attention", "lstm"]}, "config.blocks"),
    ({"blocks": ["nope"]}, "config.blocks[0]"),
    ({"ffn": "nope"}, "config.ffn"),
    ({"norm": "nope"}, "config.norm"),
    ({"vocab_size": 1}, "config.vocab_size"),
    ({"module_args": {"attention": {"n_heads": "x"}}}, "config.attention.n_heads"),
    ({"module_args": {"nope": {}}}, "config.nope"),
]


@pytest.mark.parametrize(("kwargs", "key"), ZOO_CONFIG_ROWS, ids=lambda v: str(v))
def test_zoo_config_refuses_bad_values(kwargs, key):
    from zoo.modeling import ZooConfig

    with pytest.raises(ZooError) as info:
        ZooConfig(**kwargs)
    assert str(info.value).startswith(f"{key}")


@pytest.mark.parametrize(("name", "key"), [
    ("empty_dir", "config.json"), ("config_no_d_model", "config.d_model"), ("config_bad_d_model", "config.d_model"),
    ("config_other_d_model", "config.json"), ("config_bad_block", "config.blocks[0]"), ("config_corrupt", "config.json"),
    ("llama", "config.model_type"), ("bad_safetensors", "model.safetensors"),
])
def test_from_pretrained_names_the_field(files, name, key):
    from transformers import AutoModelForCausalLM

    from zoo.modeling import ZooForCausalLM

    for load in (ZooForCausalLM.from_pretrained, *([AutoModelForCausalLM.from_pretrained] if name.startswith("config_b") else [])):
        with pytest.raises(ZooError) as info:
            load(files[name])
        assert key in str(info.value)
