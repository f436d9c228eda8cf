"""zoo.ablate: width matching by parameter count, one table row per block, failures recorded as rows."""
import csv
import json

import pytest
import torch

from conftest import tiny_overrides
from zoo.ablate import ablate, best_run, main, matched_width, model_stats, parse_args, with_block
from zoo.errors import ConfigError, ZooError
from zoo.recipe_loader import load_recipe


def test_matched_width_is_the_closest_valid_width():
    base = load_recipe("transformer_small", ["model.vocab_size=259"])
    target = model_stats(base.model)["parameters"]
    model_cfg, stats = matched_width(base.model, "lstm", target)
    assert model_cfg.blocks == ["lstm"] and "attention" not in model_cfg.module_args
    assert model_cfg.d_model % 8 == 0 and stats["parameters"] == model_stats(model_cfg)["parameters"]
    for d_model in (model_cfg.d_model - 8, model_cfg.d_model + 8):
        other = model_stats(with_block(base.model, "lstm", d_model))["parameters"]
        assert abs(other - target) >= abs(stats["parameters"] - target)
    assert stats["state_per_token"] == 0 and stats["state_fixed"] == 4 * 2 * model_cfg.d_model  # (h, c) per layer
    # rwkv7 with 64-wide heads only accepts multiples of 64.
    rwkv7_cfg, _ = matched_width(load_recipe("rwkv7_small", ["model.vocab_size=259"]).model, "rwkv7", target)
    assert rwkv7_cfg.d_model % 64 == 0


def test_parse_args_rejects_unknown_blocks_and_flags():
    args = parse_args(["recipe=transformer_small", "blocks=[attention,lstm]", "trainer.max_steps=3", "--params", "1000"])
    assert args.blocks == ["attention", "lstm"] and args.overrides == ["trainer.max_steps=3"] and args.target_params == 1000
    with pytest.raises(ConfigError, match="unknown block 'nope'"):
        parse_args(["recipe=transformer_small", "blocks=[attention,nope]"])
    with pytest.raises(ZooError, match="unrecognized arguments: --fast"):
        parse_args(["recipe=transformer_small", "blocks=[lstm]", "--fast"])
    assert main(["recipe=transformer_small"]) == 2
    assert parse_args(["recipe=mqar_small", "blocks=[conv]", "--lrs", "1e-3,3e-3,1e-2"]).lrs == [1e-3, 3e-3, 1e-2]
    assert parse_args(["recipe=mqar_small", "blocks=[conv]"]).lrs is None
    for bad in ("1e-3,fast", "0", ","):
        with pytest.raises(ConfigError, match="--lrs"):
            parse_args(["recipe=mqar_small", "blocks=[conv]", "--lrs", bad])


def test_best_run_is_the_highest_accuracy_else_the_lowest_loss():
    runs = [{"lr": 1e-3, "val_acc": 0.2, "val_loss": 1.0}, {"lr": 3e-3, "val_acc": 0.9, "val_loss": 2.0}]
    assert best_run(runs)["lr"] == 3e-3
    assert best_run([{**run, "val_acc": None} for run in runs])["lr"] == 1e-3


def test_lr_sweep_row_is_the_best_run_with_the_no_recall_floor(tmp_path):
    task = {"data.seq_len": 16, "data.task.num_kv_pairs": 2, "data.task.train_samples": 64, "data.task.val_samples": 8}
    base = load_recipe("mqar_small", tiny_overrides(tmp_path, **{"trainer.max_steps": 2, "trainer.val_every": 2, **task}))
    (row,) = ablate(base, ["conv"], lrs=[1e-3, 1e-2])
    out = tmp_path / "run"
    runs = {lr: json.loads((out / "conv" / f"lr{lr}" / "summary.json").read_text())["val_acc"] for lr in ("0.001", "0.01")}
    assert row["lr"] == float(max(runs, key=runs.get)) and row["val_acc"] == max(runs.values())
    assert row["val_acc_floor"] == pytest.approx(1 / 2) and row["val_by_lr"].startswith("0.001:")
    (table,) = csv.DictReader((out / "ablation.csv").open())
    assert float(table["lr"]) == row["lr"] and float(table["val_acc_floor"]) == pytest.approx(0.5)
    assert "| lr |" in (out / "ablation.md").read_text() and "best of learning rates 0.001, 0.01" in (out / "ablation.md").read_text()


def test_tiny_ablation_writes_the_table(tmp_path):
    task = {"data.seq_len": 16, "data.task.num_kv_pairs": 2, "data.task.train_samples": 64, "data.task.val_samples": 8}
    base = load_recipe("mqar_small", tiny_overrides(tmp_path, **{"trainer.max_steps": 4, "trainer.val_every": 2, **task}))
    rows = ablate(base, ["attention", "lstm"])
    out = tmp_path / "run"
    table = list(csv.DictReader((out / "ablation.csv").open()))
    assert [r["block"] for r in table] == ["attention", "lstm"] == [r["block"] for r in rows]
    for r in table:
        assert not r["error"]
        assert int(r["parameters"]) > 0 and int(r["d_model"]) % 8 == 0
        assert float(r["val_loss"]) > 0 and float(r["tokens_per_s"]) > 0 and 0 <= float(r["val_acc"]) <= 1
    assert int(table[0]["state_per_token"]) > 0 and int(table[1]["state_fixed"]) > 0
    md = (out / "ablation.md").read_text()
    assert "| block | d_model | parameters |" in md and "| lstm |" in md
    assert (out / "lstm" / "summary.json").exists()
    curves = (out / "ablation_curves.md").read_text()  # every validation step, not one point (val_every 2, 4 steps)
    assert "| block | step 2 | step 4 |" in curves and "| attention | 0." in curves and "| lstm | 0." in curves
    assert (out / "ablation_curves.png").stat().st_size > 1000


def test_a_failing_block_is_a_row_not_a_crash(tmp_path):
    base = load_recipe("transformer_small", tiny_overrides(tmp_path, **{"model.d_model": 8}))
    (row,) = ablate(base, ["rwkv7"])  # rwkv7's 64-wide heads fit no width up to 4 * 8
    assert row["block"] == "rwkv7" and "ConfigError" in row["error"] and "no width" in row["error"]
    assert "no width" in (tmp_path / "run" / "ablation.csv").read_text()


def test_eval_tasks_add_a_column_per_task_metric(tmp_path):
    """``--eval-tasks``: the block's checkpoint judged by lm-evaluation-harness (local tasks of test_eval.py), one
    column per task and metric, checked against log-likelihoods computed directly with the trained model."""
    pytest.importorskip("lm_eval")
    from test_eval import CONTEXTS, loglikelihood, write_tasks
    from zoo.ablate import EvalTasks
    from zoo.eval import load_causal_lm

    rows = write_tasks(tmp_path, ["a"] * len(CONTEXTS))
    base = load_recipe("transformer_small", tiny_overrides(tmp_path, **{"trainer.max_steps": 2, "trainer.val_every": 2}))
    (row,) = ablate(base, ["mamba2"], evaluation=EvalTasks(["zoo_mc", "zoo_word"], str(tmp_path), batch_size=4))
    run = tmp_path / "run" / "mamba2"
    model, tok = load_causal_lm(run / "hf", "cpu")
    words = [loglikelihood(model, tok, d["context"], " " + d["word"]) for d in rows["word"]]
    assert row["zoo_word:acc"] == pytest.approx(sum(g for _, g in words) / len(words))
    assert row["zoo_word:perplexity"] == pytest.approx(float(torch.tensor([-ll for ll, _ in words]).mean().exp()), rel=1e-4)
    scores = [[loglikelihood(model, tok, d["question"], " " + c)[0] for c in d["choices"]] for d in rows["mc"]]
    assert row["zoo_mc:acc"] == pytest.approx(sum(max(range(3), key=s.__getitem__) == d["answer"] for s, d in zip(scores, rows["mc"])) / 6)
    (table,) = csv.DictReader((tmp_path / "run" / "ablation.csv").open())
    assert float(table["zoo_mc:acc"]) == pytest.approx(row["zoo_mc:acc"], abs=1e-4) and not table["error"]
    md = (tmp_path / "run" / "ablation.md").read_text()
    assert "| zoo_mc:acc |" in md and "lm-evaluation-harness on each block's checkpoint (zoo_mc, zoo_word" in md
    assert "| zoo_word | perplexity |" in (run / "eval" / "lm_eval.md").read_text()


def test_eval_tasks_are_checked_before_any_training(tmp_path):
    pytest.importorskip("lm_eval")
    from zoo.ablate import EvalTasks

    base = load_recipe("transformer_small", tiny_overrides(tmp_path))
    with pytest.raises(ZooError, match="--eval-tasks: unknown task\\(s\\) no_such_task"):
        ablate(base, ["lstm"], evaluation=EvalTasks(["no_such_task"]))
    assert not (tmp_path / "run").exists()
    args = parse_args(["recipe=transformer_small", "blocks=[lstm]", "--eval-tasks", "a,b", "--eval-limit", "5"])
    assert args.evaluation == EvalTasks(["a", "b"], None, 5.0, 8)
    with pytest.raises(ConfigError, match="need --eval-tasks"):
        parse_args(["recipe=transformer_small", "blocks=[lstm]", "--eval-limit", "5"])
    with pytest.raises(ConfigError, match="--eval-tasks"):
        parse_args(["recipe=transformer_small", "blocks=[lstm]", "--eval-tasks", ","])
