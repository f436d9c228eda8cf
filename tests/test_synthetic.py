"""Synthetic tasks (zoo.synthetic): correct answers, answer-only masks, determinism, disjoint splits, training logs accuracy."""
import csv
import json

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from zoo.data import ZooDataModule
from zoo.errors import ConfigError
from zoo.recipe_loader import load_recipe
from zoo.synthetic import IGNORE_INDEX, TaskConfig, answer_accuracy, generate, no_recall_floor
from zoo.train import train


def test_mqar_answer_is_the_value_paired_with_the_queried_key():
    task = TaskConfig(vocab_size=64, num_kv_pairs=8, num_queries=6)
    (inputs, targets), _ = generate("mqar", task, 64, 200, 10, seed=0)
    assert inputs.shape == targets.shape == (200, 64)
    for x, y in zip(inputs, targets):
        pairs = dict(zip(x[0:16:2].tolist(), x[1:16:2].tolist()))
        assert len(pairs) == 8 and all(1 <= k < 32 for k in pairs) and all(32 <= v < 64 for v in pairs.values())
        answers = np.flatnonzero(y != IGNORE_INDEX)
        assert len(answers) == 6 and answers.min() >= 16  # queries come after the context
        for t in answers:
            assert y[t] == pairs[int(x[t])]
        # Everything after the context that is not a query is blank.
        rest = np.setdiff1d(np.arange(16, 64), answers)
        assert (x[rest] == 0).all()


def test_mqar_values_are_distinct_and_cover_the_value_half():
    task = TaskConfig(vocab_size=20, num_kv_pairs=9)  # 9 keys of 9, 9 values of 10
    (inputs, _), _ = generate("mqar", task, 36, 2000, 10, seed=0)
    values = inputs[:, 1:18:2]
    assert all(len(set(row)) == 9 for row in values.tolist())
    assert set(np.unique(values)) == set(range(10, 20))


def test_mqar_with_too_few_values_is_a_config_error():
    with pytest.raises(ConfigError, match="distinct values") as err:
        generate("mqar", TaskConfig(vocab_size=16, num_kv_pairs=8), 32, 10, 10, seed=0)
    assert err.value.path == "task.num_kv_pairs"


def test_no_recall_floor_credits_the_most_frequent_context_value():
    task = TaskConfig(vocab_size=16, num_kv_pairs=3)
    # Row 0: values 9, 9, 10 (9 most frequent); queries answer 9 and 10. Row 1: values 8, 9, 10 all tied; one query.
    inputs = np.array([[1, 9, 2, 9, 3, 10, 1, 0, 3], [1, 8, 2, 9, 3, 10, 2, 0, 0]])
    targets = np.full_like(inputs, IGNORE_INDEX)
    targets[0, 6], targets[0, 8], targets[1, 6] = 9, 10, 9
    assert no_recall_floor(inputs, targets, task) == pytest.approx((1 + 0 + 1 / 3) / 3)
    _, (val_x, val_y) = generate("mqar", TaskConfig(vocab_size=64, num_kv_pairs=8), 64, 10, 500, seed=0)
    assert no_recall_floor(val_x, val_y, TaskConfig(vocab_size=64, num_kv_pairs=8)) == pytest.approx(1 / 8)


def test_selective_copy_recalls_the_data_tokens_in_order_at_the_markers():
    task = TaskConfig(vocab_size=16, num_tokens_to_copy=5)
    (inputs, targets), _ = generate("selective_copy", task, 40, 100, 10, seed=1)
    for x, y in zip(inputs, targets):
        assert (np.flatnonzero(y != IGNORE_INDEX) == np.arange(35, 40)).all()
        assert (x[35:] == 15).all()
        data = x[:35][x[:35] != 0]
        assert len(data) == 5 and (y[35:] == data).all()


def test_induction_answer_follows_the_first_trigger():
    task = TaskConfig(vocab_size=16)
    (inputs, targets), _ = generate("induction", task, 32, 100, 10, seed=2)
    for x, y in zip(inputs, targets):
        assert (np.flatnonzero(y != IGNORE_INDEX) == [31]).all()
        triggers = np.flatnonzero(x == 15)
        assert len(triggers) == 2 and triggers[-1] == 31
        assert y[31] == x[triggers[0] + 1]


@pytest.mark.parametrize("source", ["mqar", "selective_copy", "induction"])
def test_deterministic_per_seed_and_train_val_disjoint(source):
    task = TaskConfig(vocab_size=16, num_kv_pairs=4, num_tokens_to_copy=4)
    a = generate(source, task, 16, 300, 50, seed=0)
    b = generate(source, task, 16, 300, 50, seed=0)
    c = generate(source, task, 16, 300, 50, seed=1)
    for split_a, split_b in zip(a, b):
        for arr_a, arr_b in zip(split_a, split_b):
            np.testing.assert_array_equal(arr_a, arr_b)
    assert not np.array_equal(a[0][0], c[0][0])
    (train_x, train_y), (val_x, val_y) = a
    assert len(train_x) == 300 and len(val_x) == 50
    rows = lambda x, y: {xi.tobytes() + yi.tobytes() for xi, yi in zip(x, y)}  # noqa: E731
    assert len(rows(train_x, train_y)) == 300 and not rows(train_x, train_y) & rows(val_x, val_y)


def test_too_few_distinct_samples_is_a_config_error():
    with pytest.raises(ConfigError, match="too few distinct samples"):
        generate("induction", TaskConfig(vocab_size=4), 3, 100, 10, seed=0)


@pytest.mark.parametrize(
    "overrides, path",
    [
        (["data.source=mqar", "data.seq_len=64", "data.task.num_kv_pairs=40"], "data.task.num_kv_pairs"),
        (["data.source=mqar", "data.seq_len=16", "data.task.num_kv_pairs=8"], "data.seq_len"),
        (["data.source=selective_copy", "data.seq_len=20", "data.task.num_tokens_to_copy=16"], "data.seq_len"),
        (["data.source=mqar", "data.task.bogus=1"], "data.task.bogus"),
        (["data.task.vocab_size=16"], "data.task"),
        (["data.source=mqar", "data.seq_len=64", "data.batch_size=64", "data.val_batches=100"], "data.val_batches"),
    ],
)
def test_task_config_errors_name_the_key(overrides, path):
    with pytest.raises(ConfigError) as err:
        load_recipe("transformer_small", overrides)
    assert err.value.path == path


def test_datamodule_serves_inputs_and_masked_targets():
    recipe = load_recipe("mqar_small", ["data.task.train_samples=256", "data.task.val_samples=64", "data.val_batches=1"])
    data = ZooDataModule(recipe.data, seed=recipe.seed)
    assert len(data.load_tokenizer()) == 64 + 3  # the task's vocabulary plus the special tokens
    data.setup()
    inputs, targets = next(iter(data.train_dataloader()))
    assert inputs.shape == targets.shape == (64, 64) and inputs.dtype == torch.int64
    assert ((targets != IGNORE_INDEX).sum(1) == 8).all()
    val_inputs, _ = next(iter(data.val_dataloader()))
    again = ZooDataModule(recipe.data, seed=recipe.seed)
    torch.testing.assert_close(next(iter(again.val_dataloader()))[0], val_inputs)


def test_answer_accuracy_counts_answer_positions_only():
    targets = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, 1]])
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 2, 0, 0]]), 4).float()
    accuracy, count = answer_accuracy(logits, targets)
    assert count == 2 and accuracy.item() == pytest.approx(0.5)


def test_few_step_training_logs_answer_accuracy(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"data.seq_len": 32, "data.task.num_kv_pairs": 4, "data.task.train_samples": 200, "data.task.val_samples": 20})
    recipe = load_recipe("mqar_small", overrides)
    summary = train(recipe)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert list(rows[0])[-3:] == ["train_acc", "val_acc", "val_acc_floor"]
    assert all(0 <= float(r["train_acc"]) <= 1 for r in rows if r["train_loss"])
    val = [r for r in rows if r["val_loss"]]
    assert [r["step"] for r in val] == ["3", "6"] and all(0 <= float(r["val_acc"]) <= 1 for r in val)
    assert not any(r["val_acc"] for r in rows if not r["val_loss"])
    assert all(float(r["val_acc_floor"]) == pytest.approx(1 / 4) for r in val)  # distinct values: 1 / num_kv_pairs
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["val_acc"] == pytest.approx(summary["val_acc"])
