"""``python -m zoo.eval``: loss by position (chunked == one pass, by hand, from a run's recipe) and
lm-evaluation-harness tasks on a zoo model, checked against log-likelihoods computed directly with the model."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from test_generate import tiny
from zoo.data import byte_tokenizer
from zoo.eval import main as eval_main
from zoo.eval import position_losses
from zoo.training import export_hf

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(40))


def export(tmp_path, blocks, name="run"):
    tok = byte_tokenizer()
    model = tiny(blocks, vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    export_hf(model, tok, tmp_path / name / "hf")
    return model, tok


@pytest.mark.parametrize("blocks", [["attention"], ["mamba2", "rwkv7"], ["lstm"]], ids="+".join)
def test_chunked_loss_equals_one_pass_and_a_direct_computation(blocks):
    """Windows fed 7 tokens at a time, carrying the cache, give the one-pass losses; both equal cross-entropy by hand."""
    tok = byte_tokenizer()
    model = tiny(blocks, vocab_size=len(tok))
    windows = torch.tensor(tok(TEXT)["input_ids"][: 2 * 25]).view(2, 25)  # [W=2, N + 1 = 25]
    one_pass = position_losses(model, windows, batch_size=1)
    chunked = position_losses(model, windows, chunk=7, batch_size=2)
    with torch.no_grad():
        logits = model(windows[:, :-1], use_cache=False).logits  # [2, 24, V]
    by_hand = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(0)  # [24]
    assert one_pass.shape == (24,)
    torch.testing.assert_close(one_pass, by_hand.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, one_pass, atol=1e-5, rtol=1e-5)


def test_loss_by_position_cli_two_checkpoints(tmp_path, capsys):
    data = tmp_path / "val.txt"
    data.write_text(TEXT)
    export(tmp_path, ["attention"], "attn")
    export(tmp_path, ["mamba2"], "m2")
    argv = [str(tmp_path / "attn"), str(tmp_path / "m2" / "hf"), "--loss-by-position", "--max-length", "48",
            "--bucket", "16", "--data", str(data), "--windows", "4"]
    assert eval_main(argv + ["--chunk", "16"]) == 0
    out = tmp_path / "attn" / "eval"
    result = json.loads((out / "loss_by_position.json").read_text())
    assert [r["label"] for r in result["checkpoints"]] == ["attn", "m2"]
    assert [(b["start"], b["end"]) for b in result["checkpoints"][0]["buckets"]] == [(0, 16), (16, 32), (32, 48)]
    assert all(r["windows"] == 4 and r["seq_len"] is None for r in result["checkpoints"])
    table = (out / "loss_by_position.md").read_text()
    assert table.startswith("| positions | attn | m2 |") and "| 32-47 |" in table
    assert (out / "loss_by_position.png").stat().st_size > 1000
    assert "loss_by_position.json" in capsys.readouterr().out
    assert eval_main(argv + ["--out", str(tmp_path / "one")]) == 0  # one pass: the same numbers
    again = json.loads((tmp_path / "one" / "loss_by_position.json").read_text())
    for a, b in zip(result["checkpoints"], again["checkpoints"]):
        assert [x["loss"] for x in a["buckets"]] == pytest.approx([x["loss"] for x in b["buckets"]], abs=1e-5)


def test_loss_by_position_reads_the_runs_corpus(tmp_path):
    """A run directory (recipe.yaml beside hf/): its data section gives the validation corpus (a local text source,
    tokenized as zoo.train does) and the training seq_len (here 32, evaluated to 64)."""
    from conftest import tiny_overrides
    from zoo.data import ZooDataModule
    from zoo.recipe_loader import load_recipe

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(TEXT[i * 30 :] + TEXT[: i * 30])
    recipe = load_recipe("lstm_small", tiny_overrides(tmp_path, **{"data.source": str(corpus), "data.cache_dir": str(tmp_path / "cache")}))
    model, _ = export(tmp_path, ["lstm"])
    (tmp_path / "run" / "recipe.yaml").write_text(recipe.to_yaml())
    assert eval_main([str(tmp_path / "run"), "--loss-by-position", "--max-length", "64", "--chunk", "16", "--windows", "2"]) == 0
    result = json.loads((tmp_path / "run" / "eval" / "loss_by_position.json").read_text())
    run = result["checkpoints"][0]
    assert run["seq_len"] == 32 and run["windows"] == 2 and len(run["buckets"]) == 32 and run["blocks"] == ["lstm"]
    module = ZooDataModule(recipe.data)
    module.setup()
    windows = torch.from_numpy(module.val_tokens[: 2 * 65].astype("int64")).view(2, 65)
    losses = position_losses(model, windows)  # [64]
    assert [b["loss"] for b in run["buckets"]] == pytest.approx(losses.view(32, 2).mean(1).tolist(), abs=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--max-length", "8"], "nothing to do"),
    (["--loss-by-position"], "needs --max-length"),
    (["--loss-by-position", "--max-length", "8", "--chunk", "0"], "--chunk must be >= 1"),
    (["--loss-by-position", "--max-length", "8"], "no recipe.yaml beside it"),
    (["--loss-by-position", "--max-length", "100000", "--data", "VAL"], "fewer than --max-length + 1"),
    (["--tasks", "zoo_mc", "--bootstrap-iters", "-1"], "--bootstrap-iters must be >= 0"),
])
def test_bad_arguments(tmp_path, capsys, argv, message):
    (tmp_path / "val.txt").write_text(TEXT)
    export(tmp_path, ["attention"])
    argv = [a.replace("VAL", str(tmp_path / "val.txt")) for a in argv]
    capsys.readouterr()
    assert eval_main([str(tmp_path / "run")] + argv) == 2
    err = capsys.readouterr().err
    assert "zoo.eval: error: " in err and message in err.split("zoo.eval: error: ", 1)[1]


WORDS = ["apple", "stone", "river", "cloud", "tiger", "lemon"]
CONTEXTS = ["the cat sat on the", "a", "once upon a time there was a big", "x = 1 +", "def f(x): return", "hello world and"]


def write_tasks(root, gen_targets):
    """Three local tasks over jsonl files: multiple choice (acc), a LAMBADA-style last word (log-likelihood: acc =
    greedy, perplexity) and the last word generated greedily (exact_match against ``gen_targets``)."""
    rows = {
        "mc": [{"question": c, "choices": WORDS[i % 3 : i % 3 + 3], "answer": i % 3} for i, c in enumerate(CONTEXTS)],
        "word": [{"context": c, "word": WORDS[i]} for i, c in enumerate(CONTEXTS)],
        "gen": [{"context": c, "word": w} for c, w in zip(CONTEXTS, gen_targets)],
    }
    specs = {
        "mc": 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n',
        "word": 'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: " {{word}}"\ntarget_delimiter: ""\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n',
        "gen": 'output_type: generate_until\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{word}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  do_sample: false\n  max_gen_toks: 4\nmetric_list:\n  - metric: exact_match\n',
    }
    for name, docs in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (root / f"{name}.yaml").write_text(
            f"task: zoo_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / f'{name}.jsonl'}\ntest_split: test\n" + specs[name]
        )
    return rows


def loglikelihood(model, tok, context, continuation):
    """Sum of log p(continuation tokens | context) and whether each is the argmax, from one forward of the model."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = model(torch.tensor([whole]), use_cache=False).logits[0].log_softmax(-1)  # [T, V]
    targets = torch.tensor(whole[len(ctx):])
    picked = logprobs[len(ctx) - 1 : len(whole) - 1]  # [continuation, V]
    return float(picked.gather(1, targets[:, None]).sum()), bool((picked.argmax(-1) == targets).all())


def test_lm_eval_tasks_match_a_direct_computation(tmp_path, monkeypatch):
    """Batch size 4 over 6 documents of different lengths (padding in every batch): the harness's per-choice
    log-likelihoods, accuracies, perplexity and greedy generations equal ones computed directly with the model; the
    perplexity's bootstrapped standard error is drawn without forking a pool (a forked worker hung a CI run)."""
    pytest.importorskip("lm_eval")
    import multiprocessing

    def no_pool(*args, **kwargs):
        raise AssertionError("the harness forked a multiprocessing.Pool")

    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    from zoo.eval import run_tasks
    from zoo.generate import generate_causal

    model, tok = export(tmp_path, ["mamba2", "attention"])
    greedy = [t[len(c):].split("\n")[0] for c, t in zip(CONTEXTS, generate_causal(model, tok, CONTEXTS, max_new_tokens=4, greedy=True))]
    rows = write_tasks(tmp_path, [g if i % 2 else "nope" for i, g in enumerate(greedy)])  # half the targets right
    out = run_tasks(model, tok, ["zoo_mc", "zoo_word", "zoo_gen"], include_path=str(tmp_path), batch_size=4, log_samples=True)
    results, samples = out["results"], out["samples"]

    scores = [[loglikelihood(model, tok, d["question"], " " + c)[0] for c in d["choices"]] for d in rows["mc"]]
    for sample in samples["zoo_mc"]:
        harness = [r[0][0] for r in sample["resps"]]
        assert harness == pytest.approx(scores[sample["doc_id"]], abs=1e-4)
    acc = sum(max(range(3), key=s.__getitem__) == d["answer"] for s, d in zip(scores, rows["mc"])) / len(scores)
    assert results["zoo_mc"]["acc,none"] == pytest.approx(acc)

    words = [loglikelihood(model, tok, d["context"], " " + d["word"]) for d in rows["word"]]
    for sample in samples["zoo_word"]:
        assert sample["resps"][0][0][0] == pytest.approx(words[sample["doc_id"]][0], abs=1e-4)
    assert results["zoo_word"]["acc,none"] == pytest.approx(sum(g for _, g in words) / len(words))
    assert results["zoo_word"]["perplexity,none"] == pytest.approx(float(torch.tensor([-ll for ll, _ in words]).mean().exp()), rel=1e-4)
    assert results["zoo_word"]["perplexity_stderr,none"] > 0 and "DISABLE_MULTIPROC" not in os.environ

    for sample in samples["zoo_gen"]:
        assert sample["filtered_resps"][0] == greedy[sample["doc_id"]]
    assert results["zoo_gen"]["exact_match,none"] == pytest.approx(0.5)


def test_tasks_cli_writes_json_and_markdown(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    export(tmp_path, ["lstm"])
    write_tasks(tmp_path, ["a"] * len(CONTEXTS))
    argv = [str(tmp_path / "run"), "--tasks", "zoo_mc,zoo_word", "--include-path", str(tmp_path), "--batch-size", "3"]
    assert eval_main(argv) == 0
    result = json.loads((tmp_path / "run" / "eval" / "lm_eval.json").read_text())
    assert set(result["results"]) == {"zoo_mc", "zoo_word"} and 0 <= result["results"]["zoo_mc"]["acc,none"] <= 1
    table = (tmp_path / "run" / "eval" / "lm_eval.md").read_text()
    assert table.startswith("| task | metric | value | stderr |") and "| zoo_word | perplexity |" in table
    capsys.readouterr()
    assert eval_main(argv[:1] + ["--tasks", "no_such_task", "--include-path", str(tmp_path)]) == 2
    assert "unknown task(s) no_such_task" in capsys.readouterr().err
