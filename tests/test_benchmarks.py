"""The benchmarks' CPU smoke modes: every model is measured and every report is complete. No performance is asserted."""
import json
import os

import matplotlib.image
import pytest

from benchmarks.common import is_oom
from benchmarks.throughput import SMOKE, main, markdown, zoo_models
from zoo.layers import MIXERS

# Every registered block, plus the MoE FFN and a hybrid.
BLOCKS = [*MIXERS.names(), "moe", "hybrid mamba2+attention"]


def test_smoke_report_has_every_block_with_positive_numbers(tmp_path, capsys):
    assert main(["--smoke", "--no-peers", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "throughput_smoke.json").read_text())
    meta = report["meta"]
    assert meta["device"] and meta["torch"] and meta["transformers"] and meta["date"] and meta["cpus"] >= 1
    assert meta["shapes"]["train_lengths"] == SMOKE.train_lengths
    assert sorted(report["models"]) == sorted(BLOCKS)
    for name, entry in report["models"].items():
        assert entry["kind"] == "zoo" and entry["parameters"] > 0, name
        assert sorted(entry["train"], key=int) == [str(t) for t in SMOKE.train_lengths], name
        for cell in entry["train"].values():
            assert cell["tokens_per_s"] > 0 and cell["batch"] >= 1, (name, cell)
            saved = cell["saved_activation_mib"]  # activation checkpointing keeps less for the backward
            assert 0 < saved["all"] < saved["none"], (name, saved)
    table = (tmp_path / "throughput_smoke.md").read_text()
    assert table == markdown(report) and all(f"| {name} |" in table for name in BLOCKS)
    assert "plot: " in capsys.readouterr().out
    (plot,) = tmp_path.glob("throughput_smoke_*.png")
    image = matplotlib.image.imread(plot)  # [H, W, RGBA]; matplotlib is in the dev extra
    colored = (image[..., :3].max(-1) - image[..., :3].min(-1)) > 0.2  # line colours, not the black/grey axes
    assert plot.name == "throughput_smoke_train.png" and image.shape[0] > 300 and colored.sum() > 500, colored.sum()


def test_throughput_inference_flags_name_their_replacement(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--smoke", "--contexts", "8"])
    assert exit_info.value.code == 2 and "python -m benchmarks.decode --prompt" in capsys.readouterr().err


def test_every_model_config_is_valid_at_the_default_size():
    from benchmarks.throughput import Shapes

    models = zoo_models(Shapes())
    assert sorted(models) == sorted(BLOCKS) and all(cfg.d_model == 768 for cfg in models.values())


def test_out_of_memory_is_recognized():
    import torch

    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_oom(ValueError("shape mismatch"))


def test_decode_benchmark_smoke_reports_every_recipe_and_mode(tmp_path):
    from benchmarks.decode import main as decode_main, markdown as decode_markdown, text_recipes

    recipes = text_recipes()  # from the registry: the causal text recipes, not diffusion, fine-tuning or synthetic tasks
    assert {"transformer_small", "mamba_small", "hybrid_small"} <= set(recipes)
    assert not {"diffusion_small", "lora_small", "mqar_small"} & set(recipes)
    assert decode_main(["--smoke", "--batches", "2", "--prompt", "6,9", "--new-tokens", "3", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("decode_smoke-*.json")
    report = json.loads(json_path.read_text())
    assert report["meta"]["modes"] == ["generate", "static"] and report["meta"]["device"] and report["meta"]["zoo"]
    assert list(report["models"]) == recipes
    for recipe, entry in report["models"].items():
        for key in ("generate@2@6", "static@2@6", "generate@2@9", "static@2@9"):
            assert entry[key]["tokens_per_s"] > 0 and entry[key]["prefill_ms"] > 0, (recipe, key, entry[key])
    assert json_path.with_suffix(".md").read_text() == decode_markdown(report)


def test_decode_dry_run_plans_without_timing(capsys):
    from benchmarks.decode import main as decode_main

    assert decode_main(["--dry-run", "--smoke", "--recipes", "mamba_small", "--prompt", "4,8"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["recipes"] == {"mamba_small": {"blocks": ["mamba"], "n_layers": 4, "d_model": 64}}
    assert plan["shapes"]["prompts"] == [4, 8] and plan["modes"] == ["generate", "static"]


def test_timing_memory_and_guard_helpers():
    from benchmarks.common import MemorySampler, guarded, machine, time_ms

    calls = []
    assert time_ms(lambda: calls.append(1), warmup=2, iters=3) >= 0 and len(calls) == 5
    assert guarded(lambda: 1 / 0) == {"error": "ZeroDivisionError: division by zero"}
    assert guarded(lambda: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))) == "oom"
    sampler = MemorySampler(interval=3600)
    block = bytearray(64 * 2**20)  # held while the sampler's last sample is taken
    (peak,) = sampler.stop().values()
    assert peak["anon"] > 64 and peak["rss"] >= peak["anon"] and len(block) > 0
    meta = machine(packages=("numpy",))
    assert meta["cpus"] >= 1 and meta["torch"] and meta["numpy"] and len(meta["load_average"]) == 3


def test_data_benchmark_smoke_reports_both_phases(tmp_path):
    from benchmarks.data import main as data_main, markdown as data_markdown

    assert data_main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "data-smoke.json").read_text())
    assert report["meta"]["corpus_bytes"] >= 300_000 and report["meta"]["datasets"] and report["meta"]["device"]
    phases = report["phases"]
    assert set(phases) == {"tokenize", "load"}
    assert phases["tokenize"]["tokens"] > report["meta"]["corpus_bytes"]  # bytes + one EOS a document
    assert phases["load"]["tokens"] == 5 * 16 * 256
    assert all(p["tokens_per_s"] > 0 and p["peak_rss_mb"] >= p["rss_start_mb"] > 0 for p in phases.values())
    assert (tmp_path / "data-smoke.md").read_text() == data_markdown(report)


def test_train_at_scale_corpus_and_tokenizer_need_uint32(tmp_path):
    """benchmarks.train_at_scale's inputs: parquet files and a 70,000-id tokenizer whose corpus words lie beyond uint16."""
    import numpy as np

    from benchmarks.train_at_scale import WORD_IDS_FROM, peaks_by_label, tree_memory, write_parquet_corpus, write_tokenizer
    from zoo.config import DataConfig
    from zoo.data import ZooDataModule

    files, words = write_parquet_corpus(tmp_path / "corpus", 300_000, rows_per_file=8)
    assert files == 3 and len(words) > 100 and not (tmp_path / "corpus-text").exists()
    write_tokenizer(tmp_path / "tokenizer.json", words)
    dm = ZooDataModule(DataConfig(source=str(tmp_path / "corpus"), tokenizer=str(tmp_path / "tokenizer.json"), seq_len=32,
                                  val_fraction=0.1, cache_dir=str(tmp_path / "cache")))
    dm.setup()
    tokens = np.asarray(dm.train_tokens)
    # every token but the rare fragment (a document's last word is cut at its byte size: unknown, id 0) is a corpus word
    assert tokens.dtype == np.uint32 and (tokens >= WORD_IDS_FROM).mean() > 0.99 and tokens.max() > 65_535
    peaks = peaks_by_label(tree_memory(os.getpid(), interval=3600).stop())  # stop() samples once more: no race
    assert peaks["rank 0"]["processes"] == 1 and peaks["rank 0"]["peak_anon_mb"] > 10


def test_zoology_table_marks_cells_not_run_and_partial_sweeps():
    from benchmarks.zoology import markdown as zoology_markdown, parse_variant

    assert parse_variant("attention+conv3") == ("attention", 3) and parse_variant("mamba2") == ("mamba2", 0)
    meta = {"device": "m", "cpus": 2, "load_start": "0", "load_end": "0", "torch": "t", "lightning": "l", "date": "d", "command": "c",
            "lrs": [1e-3, 3e-3], "seeds": [0], "wall_min": 1.0, "budget_min": 1.0, "pairs": [(4, 64)], "widths": [64, 128],
            "variants": ["attention+conv3", "conv"]}
    runs = {"attention+conv3|4|64|64|0.001|0": {"val_acc": 0.5}, "attention+conv3|4|64|64|0.003|0": {"val_acc": 0.9},
            "attention+conv3|4|64|128|0.001|0": {"val_acc": 0.7}, "conv|4|64|64|0.001|0": {"error": "ValueError: x"}}
    table = zoology_markdown({"meta": meta, "runs": runs})
    assert "| attention+conv3 | 0.900 | 0.700* |" in table  # best of the two rates; one rate run of the second cell
    assert "| conv | error | not run |" in table


def test_decode_benchmark_vs_hf_compares_every_peer_on_the_same_weights(tmp_path, capsys):
    from benchmarks.decode import hf_peers, main as decode_main, vs_hf_markdown

    argv = ["--vs-hf", "--batches", "1,2", "--prompt", "5", "--new-tokens", "3", "--repeats", "1", "--out", str(tmp_path)]
    assert decode_main(argv) == 0
    (json_path,) = tmp_path.glob("decode-vs-hf-*.json")
    report = json.loads(json_path.read_text())
    assert list(report["models"]) == ["llama", "mixtral", "qwen3_next", "mamba", "mamba2"] and {"llama", "mamba2"} <= set(hf_peers())
    assert len(report["meta"]["load_average"]) == 6
    for name, entry in report["models"].items():
        for batch in (1, 2):
            cell = entry[f"batch{batch}"]
            assert cell["hf_tokens_per_s"] > 0 and cell["zoo_tokens_per_s"] > 0 and cell["ratio"] > 0, (name, cell)
            assert cell["same_tokens"], (name, batch)  # greedy on the converted weights: the same tokens
    assert json_path.with_suffix(".md").read_text() == vs_hf_markdown(report)
    with pytest.raises(SystemExit) as exit_info:
        decode_main(["--vs-hf", "--models", "llama,gpt2"])
    assert exit_info.value.code == 2 and "--models: no Hugging Face peer for gpt2" in capsys.readouterr().err


def test_decode_prompt_lookup_compares_a_checkpoint_with_itself_greedy(tmp_path):
    from benchmarks.decode import main as decode_main, prompt_lookup_markdown
    from zoo.data import byte_tokenizer
    from zoo.modeling import ZooConfig, ZooForCausalLM
    from zoo.recipe_loader import load_recipe

    export = tmp_path / "tiny" / "hf"  # a run's export: reported under the run's name
    cfg = load_recipe("transformer_small", ["model.d_model=64", "model.n_layers=2", "model.vocab_size=259"]).model
    ZooForCausalLM(ZooConfig.from_model_config(cfg)).save_pretrained(export)
    byte_tokenizer().save_pretrained(export)
    argv = ["--prompt-lookup", str(export), "--prompts", "1", "--prompt", "32", "--new-tokens", "8", "--repeats", "1"]
    assert decode_main([*argv, "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("prompt-lookup-*.json")
    report = json.loads(json_path.read_text())
    entry = report["models"]["tiny"]
    assert entry["same_tokens"] and entry["blocks"] == ["attention"] and entry["tokens_per_forward"] >= 1
    assert entry["greedy_tokens_per_s"] > 0 and entry["lookup_tokens_per_s"] > 0
    assert json_path.with_suffix(".md").read_text() == prompt_lookup_markdown(report)


def test_kernel_benchmark_times_every_registry_call_of_an_op(tmp_path, capsys):
    """benchmarks.kernels reads its implementations from zoo.kernels.registry: every non-peer call of the op is
    timed (the Triton ones in the interpreter), peers are left out on CPU; --quick plans the GPU check's sizes."""
    from benchmarks.kernels import BENCHES, main as kernels_main
    from zoo.kernels.registry import CALLS, CALLS_BY_NAME

    report = kernels_main(["--smoke", "--ops", "selective_scan", "--sizes", "8:1", "--out", str(tmp_path)])
    runs = report["ops"]["selective_scan"]["runs"]
    expected = [c.backend for c in CALLS if c.op.name == "selective_scan" and not c.peer and not c.step]
    assert [r["impl"] for r in runs] == expected == ["triton_recurrent", "torch"]
    assert [(r["fwd_ratio"], r["fwd_bwd_ratio"]) for r in runs][0] == (1.0, 1.0)
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in runs)
    assert report["ops"]["selective_scan"]["peers_missing"] == ["mamba_ssm"]
    assert "| 8 | 1 | triton_recurrent |" in (tmp_path / "kernels-smoke.md").read_text()
    assert sorted(BENCHES) == ["dplr_delta_rule", "gated_delta_rule", "kda", "retention", "rwkv6", "selective_scan", "ssd"]
    for op in ("gated_delta_rule", "kda"):  # issue 27: zoo vs fla
        assert [(c.backend, c.peer) for c in BENCHES[op]] == [
            ("triton_chunk", False), ("triton_recurrent", False), ("torch", False), ("fla", True)]
    assert "ssd/triton_chunk/step" not in [c.name for calls in BENCHES.values() for c in calls]
    with pytest.raises(SystemExit):
        kernels_main(["--smoke", "--quick"])
    assert "not allowed with argument --smoke" in capsys.readouterr().err
    plan = kernels_main(["--quick", "--dry-run", "--ops", "rwkv6"])
    assert plan["sizes"] == [{"T": 1024, "batch": 4}, {"T": 4096, "batch": 1}] and plan["iters"] == 3
    plan = kernels_main(["--dry-run", "--smoke", "--ops", "gated_delta_rule", "kda"])
    for op in ("gated_delta_rule", "kda"):  # fla's kernels need CUDA: left out on CPU like every peer
        assert plan["ops"][op]["implementations"][:3] == ["triton_chunk", "triton_recurrent", "torch"]
        assert plan["ops"][op]["peers_missing"] == ([] if plan["cuda"] and CALLS_BY_NAME[f"{op}/fla"].available() else ["fla"])



def test_rwkv7_is_the_old_name_of_dplr_delta_rule():
    """Issue 27: the generalized delta rule op is ``dplr_delta_rule``; ``zoo.kernels.rwkv7`` keeps its old public names
    as the same objects (the Triton functions loaded on first use, as before), and ``rwkv7`` still selects the op
    where a command line names ops (benchmarks.kernels and its --model roofline, benchmarks.kernel_resources)."""
    import zoo.kernels.dplr_delta_rule as op
    import zoo.kernels.rwkv7 as old
    from benchmarks.kernel_resources import selected_calls
    from benchmarks.kernels import main as kernels_main
    from zoo.kernels.registry import CALLS_BY_NAME, OPS, op_name

    assert old.__all__ == ["BACKENDS", "GATED_DELTA_BACKENDS", "KDA_BACKENDS", "gated_delta_rule", "kda_rule", "rwkv7",
                           "rwkv7_chunked", "rwkv7_naive", "rwkv7_step", "rwkv7_triton", "rwkv7_triton_chunk"]
    for name in [*old.__all__, "rwkv7_recurrent", "rwkv7_keys"]:
        assert getattr(old, name) is getattr(op, name.replace("rwkv7", "dplr_delta_rule")), name
    assert old.BACKENDS.op == "dplr_delta_rule" and OPS["dplr_delta_rule"].fn is old.rwkv7
    assert (op_name("rwkv7"), op_name("rwkv7/triton_chunk"), op_name("rwkv6")) == ("dplr_delta_rule", "dplr_delta_rule/triton_chunk", "rwkv6")
    assert list(kernels_main(["--dry-run", "--smoke", "--ops", "rwkv7"])["ops"]) == ["dplr_delta_rule"]
    assert [c.name for c in selected_calls(("rwkv7",))] == ["dplr_delta_rule/triton_recurrent", "dplr_delta_rule/triton_chunk",
                                                           "dplr_delta_rule/triton_chunk/packed"]
    assert selected_calls(("rwkv7/triton_chunk",)) == [CALLS_BY_NAME[f"dplr_delta_rule/triton_chunk{s}"] for s in ("", "/packed")]

def test_packing_benchmark_smoke_writes_its_report(tmp_path):
    """benchmarks.packing --smoke: the three modes timed per block, after checking one call equals one per document."""
    from benchmarks.packing import main as packing_main, markdown as packing_markdown

    report = packing_main(["--smoke", "--iters", "1", "--blocks", "attention,lstm", "--out", str(tmp_path / "packing")])
    assert set(report["results"]) == {"attention", "lstm"} and report["documents_per_row"] > 1
    for row in report["results"].values():
        assert row["one call ms"] > 0 and row["per document ms"] > 0 and row["concat ms"] > 0
    saved = json.loads((tmp_path / "packing.json").read_text())
    assert saved["results"] == report["results"] and (tmp_path / "packing.md").read_text() == packing_markdown(report)
    with pytest.raises(SystemExit):
        packing_main(["--smoke", "--blocks", "nope"])


def test_torch_forms_benchmark_times_both_forms_on_the_same_model(tmp_path):
    from benchmarks.torch_forms import main as forms_main, markdown

    report = forms_main(["--smoke", "--repeats", "1", "--recipes", "gated_deltanet_small", "--out", str(tmp_path / "forms")])
    row = report["results"]["gated_deltanet_small"]
    assert row["recurrent_tokens_per_s"] > 0 and row["chunked_tokens_per_s"] > 0
    assert row["loss_difference"] < 1e-4  # the two forms compute the same model
    assert (tmp_path / "forms.md").read_text() == markdown(report)
