"""Synthetic recall tasks as data sources (``data.source: mqar | selective_copy | induction``).

Each generator returns ``inputs [N, T]`` and ``targets [N, T]`` (int64) where ``targets[n, t]`` is the token the
model must predict after reading ``inputs[n, :t + 1]`` at an answer position and -100 everywhere else, so the loss
and accuracy count answer positions only. Token 0 is the blank/filler token of every task.

- ``mqar``: multi-query associative recall as in Zoology (Arora et al. 2023): ``num_kv_pairs`` key-value pairs
  (distinct keys from the lower half of the vocabulary, distinct values from the upper half), then the keys queried
  again at power-law spaced positions among blanks; the answer after a query key is the value it was paired with.
  :func:`no_recall_floor` is the accuracy reachable without recall (``1 / num_kv_pairs``).
- ``selective_copy``: selective copying as in Mamba (Gu & Dao 2023): ``num_tokens_to_copy`` data tokens at random
  positions among blanks, then as many marker tokens; at the markers the data tokens are recalled in order.
- ``induction``: induction heads as in Mamba: random tokens with one trigger token somewhere; the sequence ends
  with the trigger again and the answer is the token that followed its first occurrence.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from zoo.errors import ConfigError
from zoo.typed import bounded, checked

IGNORE_INDEX = -100
BLANK = 0


@dataclass
@checked
class TaskConfig:
    """A synthetic task's settings (``data.task``, for ``data.source`` in :data:`GENERATORS`).

    ``vocab_size`` is the task's token vocabulary (the model's is 3 larger: the tokenizer's special tokens).
    """

    vocab_size: int = bounded(64, ge=4, note="blank, markers and data tokens")
    num_kv_pairs: int = bounded(8, ge=1)  # mqar
    num_queries: int | None = None  # mqar; None: every key is queried
    power_a: float = bounded(0.01, gt=0)  # mqar: query gaps drawn with weight ~ gap^(power_a - 1), as in Zoology
    num_tokens_to_copy: int = bounded(16, ge=1)  # selective_copy
    train_samples: int = bounded(20000, ge=1)
    val_samples: int = bounded(1000, ge=1)

    def queries(self) -> int:
        return self.num_kv_pairs if self.num_queries is None else self.num_queries

    def validate(self, source: str, seq_len: int) -> None:
        """Check the settings against the task and ``data.seq_len``; errors name ``task.KEY`` or ``seq_len``."""
        if source == "mqar":
            keys, values = self.vocab_size // 2 - 1, self.vocab_size - self.vocab_size // 2
            if self.num_kv_pairs > min(keys, values):
                raise ConfigError(
                    "task.num_kv_pairs", f"{self.num_kv_pairs} pairs need as many distinct keys (vocab_size={self.vocab_size} has "
                    f"{keys}, tokens 1..{self.vocab_size // 2 - 1}) and distinct values ({values}, tokens "
                    f"{self.vocab_size // 2}..{self.vocab_size - 1}): vocab_size >= {2 * self.num_kv_pairs + 2}",
                )
            if not 1 <= self.queries() <= self.num_kv_pairs:
                raise ConfigError("task.num_queries", f"must be in [1, num_kv_pairs={self.num_kv_pairs}], got {self.num_queries}")
            if (seq_len + 1 - 2 * self.num_kv_pairs) // 2 < self.queries():
                raise ConfigError("seq_len", f"mqar needs seq_len >= {2 * self.num_kv_pairs + 2 * self.queries() - 1} for {self.num_kv_pairs} pairs and {self.queries()} queries, got {seq_len}")
        elif source == "selective_copy" and seq_len < 2 * self.num_tokens_to_copy:
            raise ConfigError("seq_len", f"selective_copy needs seq_len >= 2 * num_tokens_to_copy = {2 * self.num_tokens_to_copy}, got {seq_len}")
        elif source == "induction" and seq_len < 3:
            raise ConfigError("seq_len", f"induction needs seq_len >= 3, got {seq_len}")


def mqar(rng: np.random.Generator, n: int, seq_len: int, task: TaskConfig) -> tuple[np.ndarray, np.ndarray]:
    """Zoology's ``multiquery_ar``: distinct keys in ``[1, V/2)``, distinct values in ``[V/2, V)`` (both drawn
    without replacement, as Zoology does), power-law query gaps."""
    num_pairs, num_queries = task.num_kv_pairs, task.queries()
    context = 2 * num_pairs
    key_vocab = task.vocab_size // 2
    keys = 1 + rng.random((n, key_vocab - 1)).argsort(axis=1)[:, :num_pairs]  # [N, P], distinct per row
    values = key_vocab + rng.random((n, task.vocab_size - key_vocab)).argsort(axis=1)[:, :num_pairs]  # [N, P], distinct per row
    examples = np.zeros((n, seq_len + 1), dtype=np.int64)
    examples[:, 0:context:2] = keys
    examples[:, 1:context:2] = values
    # Query slots are every other position after the context; the slot k steps away has weight ~ k^(a-1).
    space = (seq_len + 1 - context) // 2
    weights = task.power_a * np.arange(1, space + 1) ** (task.power_a - 1)
    weights = weights / weights.sum()
    slots = np.stack([rng.choice(space, num_queries, replace=False, p=weights) for _ in range(n)])  # [N, Q]
    asked = rng.random((n, num_pairs)).argsort(axis=1)[:, :num_queries]  # [N, Q], which pairs are queried
    rows = np.arange(n)[:, None]
    query_pos = context + 2 * slots  # [N, Q], position of each query key in ``examples``
    examples[rows, query_pos] = keys[rows, asked]
    targets = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    targets[rows, query_pos] = values[rows, asked]
    return examples[:, :-1], targets


def selective_copy(rng: np.random.Generator, n: int, seq_len: int, task: TaskConfig) -> tuple[np.ndarray, np.ndarray]:
    """Data tokens in ``[1, V-1)`` scattered over the first ``T - k`` positions; markers (``V-1``) in the last ``k``."""
    k = task.num_tokens_to_copy
    region = seq_len - k
    data = rng.integers(1, task.vocab_size - 1, size=(n, k))  # [N, k]
    positions = np.sort(rng.random((n, region)).argsort(axis=1)[:, :k], axis=1)  # [N, k], increasing
    rows = np.arange(n)[:, None]
    inputs = np.zeros((n, seq_len), dtype=np.int64)
    inputs[rows, positions] = data
    inputs[:, region:] = task.vocab_size - 1
    targets = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    # After reading marker j (position region + j) the model outputs data token j.
    targets[:, region:] = data
    return inputs, targets


def induction(rng: np.random.Generator, n: int, seq_len: int, task: TaskConfig) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens in ``[1, V-1)``; the trigger ``V-1`` once early and as the last input; answer: its successor."""
    trigger = task.vocab_size - 1
    inputs = rng.integers(1, trigger, size=(n, seq_len))  # [N, T], no trigger
    first = rng.integers(0, seq_len - 2, size=n)  # the trigger's first position, its successor before the end
    rows = np.arange(n)
    inputs[rows, first] = trigger
    inputs[:, -1] = trigger
    targets = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    targets[:, -1] = inputs[rows, first + 1]
    return inputs, targets


GENERATORS = {"mqar": mqar, "selective_copy": selective_copy, "induction": induction}


def generate(source: str, task: TaskConfig, seq_len: int, train_samples: int, val_samples: int, seed: int):
    """``(train_inputs, train_targets), (val_inputs, val_targets)``: deterministic for ``seed``, no sample shared.

    Samples are drawn in one stream, duplicates dropped, and the first ``val_samples`` distinct ones go to validation.
    """
    if source not in GENERATORS:
        raise ConfigError("data.source", f"'{source}' is not a synthetic task; tasks: {', '.join(GENERATORS)}")
    task.validate(source, seq_len)
    need = train_samples + val_samples
    rng = np.random.default_rng([seed, list(GENERATORS).index(source)])
    inputs, targets = GENERATORS[source](rng, need + need // 10 + 16, seq_len, task)
    digests = [hashlib.sha1(row.tobytes() + t.tobytes()).digest() for row, t in zip(inputs, targets)]
    _, first_seen = np.unique(np.array(digests), return_index=True)
    keep = np.sort(first_seen)
    if len(keep) < need:
        raise ConfigError(
            "data.task", f"{source} with these settings has too few distinct samples ({len(keep)}) for "
            f"{train_samples} train + {val_samples} validation; raise vocab_size or seq_len, or lower the sample counts",
        )
    val, train = keep[:val_samples], keep[val_samples:need]
    return (inputs[train], targets[train]), (inputs[val], targets[val])


def no_recall_floor(inputs: np.ndarray, targets: np.ndarray, task: TaskConfig) -> float:
    """Accuracy of the best predictor that reads an MQAR context's values but never recalls which key they follow.

    Such a predictor answers every query with the most frequent value among the context's ``num_kv_pairs`` values
    (positions ``1, 3, ..., 2P-1``), ties broken uniformly at random. Its expected accuracy, computed exactly from
    ``inputs [N, T]`` and ``targets [N, T]``: each answer position scores ``1 / k`` when its answer is one of the
    ``k`` values tied for most frequent in its row's context, else 0; the floor is the mean over answer positions.
    With distinct values every value is tied, so the floor is ``1 / num_kv_pairs``.
    """
    context_values = inputs[:, 1 : 2 * task.num_kv_pairs : 2]  # [N, P]
    counts = (context_values[:, :, None] == context_values[:, None, :]).sum(-1)  # [N, P], occurrences of each value
    top = counts.max(axis=1, keepdims=True)  # [N, 1]
    tied = (counts == top).sum(axis=1) // top[:, 0]  # [N], number of distinct values tied for most frequent
    rows, cols = np.nonzero(targets != IGNORE_INDEX)
    answers = targets[rows, cols]  # [A]
    hit = ((context_values[rows] == answers[:, None]) & (counts[rows] == top[rows])).any(axis=1)  # [A]
    return float((hit / tied[rows]).mean()) if len(answers) else 0.0


def answer_accuracy(logits, targets):
    """Fraction of answer positions (targets != -100) where ``logits [B, T, V]`` put the answer on top, and their count."""
    mask = targets != IGNORE_INDEX
    count = int(mask.sum())
    if count == 0:
        return logits.new_zeros(()), 0
    correct = (logits.argmax(-1) == targets) & mask
    return correct.sum().float() / count, count
