import subprocess
import sys
from pathlib import Path

import pytest

from zoo.config import ModelConfig, Recipe
from zoo.errors import ConfigError
from zoo.layers import MIXERS
from zoo.recipe_loader import builtin_recipe_names, load_recipe, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPE_FILES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_every_recipe_file_is_built_in():
    assert RECIPE_FILES and sorted(p.stem for p in RECIPE_FILES) == builtin_recipe_names()


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_validates(path):
    recipe = load_recipe(str(path))
    assert recipe.name == path.stem
    assert recipe.output_dir == f"checkpoints/{path.stem}"
    for block in recipe.model.blocks:
        assert block in MIXERS
    assert recipe.model.n_layers % len(recipe.model.blocks) == 0
    # The resolved recipe round-trips through its YAML form.
    again = Recipe.from_dict(__import__("yaml").safe_load(recipe.to_yaml()))
    assert again.to_dict() == recipe.to_dict()


def test_base_inheritance_and_overrides():
    r = load_recipe("lstm_small", ["model.blocks=[lstm,attention]", "trainer.max_steps=7", "optimizer.betas=[0.8,0.9]"])
    assert r.model.blocks == ["lstm", "attention"]
    assert r.model.d_model == load_recipe("transformer_small").model.d_model  # inherited
    assert r.model.layer_blocks() == ["lstm", "attention", "lstm", "attention"]
    assert r.trainer.max_steps == 7 and r.optimizer.betas == [0.8, 0.9]
    assert r.model.args_for("lstm").hidden_size == 256


@pytest.mark.parametrize(
    "overrides, path, words",
    [
        (["model.attention.n_headz=3"], "model.attention.n_headz", ["unknown key", "n_heads"]),
        (["trainer.max_stepz=3"], "trainer.max_stepz", ["unknown key", "max_steps"]),
        (["model.blocks=[attention,nope]"], "model.blocks[1]", ["unknown block 'nope'", "attention", "lstm"]),
        (["model.ffn=nope"], "model.ffn", ["unknown ffn 'nope'", "swiglu"]),
        (["model.nope.x=1"], "model.nope", ["unknown key", "attention", "d_model"]),
        (["trainer.max_steps=abc"], "trainer.max_steps", ["expected int"]),
        (["trainer.max_steps=1.5"], "trainer.max_steps", ["expected int"]),
        (["trainer.progress_bar=3"], "trainer.progress_bar", ["expected bool"]),
        (["model.attention.n_kv_heads=3"], "model.attention.n_kv_heads", ["multiple of n_kv_heads=3"]),
        (["model.attention.n_heads=3"], "model.attention.n_heads", ["not divisible"]),
        (["model.blocks=[attention,lstm,lstm]"], "model.blocks", ["does not tile n_layers=4"]),
        (["data.tokenizer=no such/tok/dir"], "data.tokenizer", ["'byte'", "'bpe'", "hub name"]),
        (["data.tokenizer=missing/tokenizer.json"], "data.tokenizer", ["no such tokenizer file"]),
        (["data.seq_len=0"], "data.seq_len", [">= 1"]),
        (["optimizer.betas=[0.9]"], "optimizer.betas", ["two numbers"]),
    ],
)
def test_bad_recipes_name_the_key(overrides, path, words):
    with pytest.raises(ConfigError) as info:
        load_recipe("transformer_small", overrides)
    assert info.value.path == path
    for word in words:
        assert word in str(info.value)


def test_unknown_recipe_lists_the_built_ins():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*transformer_small"):
        load_recipe("nope")


def test_base_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b\n")
    (tmp_path / "b.yaml").write_text("base: a\n")
    with pytest.raises(ConfigError, match="cycle: a -> b -> a"):
        load_recipe(str(tmp_path / "a.yaml"))


def test_recipe_file_with_local_base(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: transformer_small\nmodel:\n  n_layers: 2\n")
    (tmp_path / "child.yaml").write_text("base: mine\nseed: 5\n")
    r = load_recipe(str(tmp_path / "child.yaml"))
    assert (r.name, r.seed, r.model.n_layers) == ("child", 5, 2)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides(["trainer.max_steps"])


def test_model_config_defaults_fill_used_modules():
    mc = ModelConfig.from_dict({"blocks": ["lstm"], "d_model": 64})
    assert set(mc.module_args) == {"lstm", "swiglu"}
    assert ModelConfig.from_dict(mc.to_dict()).to_dict() == mc.to_dict()


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "zoo.train", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_bad_recipe_exits_2_before_building_anything(tmp_path):
    out = tmp_path / "out"
    proc = _cli("recipe=transformer_small", "model.attention.n_headz=3", f"output_dir={out}")
    assert proc.returncode == 2
    assert "model.attention.n_headz: unknown key" in proc.stderr
    assert not out.exists()
    proc = _cli("recipe=transformer_small", "model.blocks=[mamba9]")
    assert proc.returncode == 2 and "unknown block 'mamba9'" in proc.stderr and ", ".join(sorted(MIXERS.names())) in proc.stderr
    proc = _cli("recipe=nope")
    assert proc.returncode == 2 and "unknown recipe 'nope'" in proc.stderr
    proc = _cli("trainer.max_steps=3")
    assert proc.returncode == 2 and "no recipe given" in proc.stderr


def test_cli_print_shows_resolved_recipe():
    proc = _cli("recipe=lstm_small", "trainer.max_steps=12", "--print")
    assert proc.returncode == 0, proc.stderr
    resolved = __import__("yaml").safe_load(proc.stdout)
    assert resolved["name"] == "lstm_small"
    assert resolved["trainer"]["max_steps"] == 12
    assert resolved["model"]["blocks"] == ["lstm"]
    assert resolved["model"]["lstm"]["hidden_size"] == 256
