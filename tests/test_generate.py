"""Generation for every block and hybrids: greedy == full-forward argmax, left-padded batches == one by one,
HF sampling parameters, one-token decode steps, the text-generation pipeline and ``python -m zoo.generate``."""
import pytest
import torch
import transformers

import zoo  # noqa: F401  (registers the zoo model type for the pipeline)
from test_blocks import TEST_ARGS
from zoo.config import ModelConfig
from zoo.data import byte_tokenizer
from zoo.generate import main as generate_main
from zoo.layers import MIXERS
from zoo.modeling import ZooConfig, ZooForCausalLM
from zoo.training import export_hf

VOCAB = 50
PAD = 0
# Every block alone, plus hybrids with a stateful FFN (RWKV channel mix) and an MoE FFN.
MODELS = [([name], "swiglu") for name in MIXERS.names()] + [
    (["mamba", "attention"], "moe"),
    (["rwkv7", "attention"], "rwkv_cmix"),
    (["lstm", "retnet", "mamba2", "attention"], ["swiglu", "none"]),
]
IDS = ["+".join(blocks) + f"/{ffn if isinstance(ffn, str) else '+'.join(ffn)}" for blocks, ffn in MODELS]


def tiny(blocks, ffn="swiglu", vocab_size=VOCAB, **special):
    args = {name: TEST_ARGS[name] for name in blocks if name in TEST_ARGS}
    if ffn == "moe":
        args["moe"] = {"num_experts": 4, "top_k": 2, "expert_hidden": 32}
    spec = ModelConfig.from_dict({"d_model": 48, "n_layers": max(2, len(blocks)), "blocks": list(blocks), "ffn": ffn, "vocab_size": vocab_size, **args})
    torch.manual_seed(0)
    return ZooForCausalLM(ZooConfig.from_model_config(spec, **special)).eval()


def greedy(model, ids, n, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=PAD, **kw)


@pytest.mark.parametrize("blocks, ffn", MODELS, ids=IDS)
def test_greedy_decode_and_left_padded_batches(blocks, ffn):
    """Each prompt alone: greedy tokens are the full forward's argmax at every step (one forward over the whole
    generated sequence checks them all). A left-padded batch of the prompts gives the same tokens and scores."""
    model = tiny(blocks, ffn)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (3, 6)]
    singles = []
    for prompt in prompts:
        single = greedy(model, prompt[None], 4, output_scores=True, return_dict_in_generate=True)
        with torch.no_grad():
            logits = model(single.sequences[:, :-1], use_cache=False).logits  # [1, T + 3, V]
        assert torch.equal(logits[0, len(prompt) - 1 :].argmax(-1), single.sequences[0, len(prompt) :])
        singles.append(single)
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((width - len(p),), PAD), p]) for p in prompts])  # [2, 6], left padded
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    batch = greedy(model, ids, 4, attention_mask=mask, output_scores=True, return_dict_in_generate=True)
    for row, (prompt, single) in enumerate(zip(prompts, singles)):
        assert torch.equal(batch.sequences[row, width:], single.sequences[0, len(prompt) :])
        for batch_scores, single_scores in zip(batch.scores, single.scores):
            torch.testing.assert_close(batch_scores[row], single_scores[0], atol=1e-4, rtol=1e-4)


def test_left_padded_beam_search_equals_one_by_one():
    model = tiny(["mamba", "attention"], "swiglu")
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (2, 6)]
    ids = torch.stack([torch.cat([torch.full((6 - len(p),), PAD), p]) for p in prompts])
    mask = (ids != PAD).long()
    batch = greedy(model, ids, 4, attention_mask=mask, num_beams=3)
    for row, prompt in enumerate(prompts):
        assert torch.equal(batch[row, 6:], greedy(model, prompt[None], 4, num_beams=3)[0, len(prompt):])


def test_sampling_parameters_work_as_in_hf():
    model = tiny(["attention"])
    prompt = torch.randint(1, VOCAB, (2, 4))
    reference = greedy(model, prompt, 6)
    sample = lambda seed, **kw: (torch.manual_seed(seed), model.generate(  # noqa: E731
        prompt, max_new_tokens=6, do_sample=True, eos_token_id=None, pad_token_id=PAD, **kw))[1]
    assert torch.equal(sample(1, top_k=1), reference)
    assert torch.equal(sample(2, top_p=1e-6, top_k=0), reference)
    assert torch.equal(sample(3, temperature=1e-4, top_k=0), reference)
    first, again = sample(4, temperature=1.5, top_k=0), sample(4, temperature=1.5, top_k=0)
    assert torch.equal(first, again)  # seeded sampling is reproducible
    assert not torch.equal(first, reference)  # and is not greedy (untrained model: a near-uniform distribution)
    assert not torch.equal(first, sample(5, temperature=1.5, top_k=0))


def test_decode_steps_feed_one_token_not_the_prompt():
    model = tiny(["attention", "mamba2"])
    seen = []
    hook = model.model.embed.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    prompt = torch.randint(1, VOCAB, (2, 9))
    out = greedy(model, prompt, 5, return_dict_in_generate=True)
    hook.remove()
    assert seen == [(2, 9)] + [(2, 1)] * 4  # prefill once, then one token per step (the 5th token needs no forward)
    cache = out.past_key_values
    assert cache.get_seq_length() == 13
    assert cache.states[0].k.shape[2] == 13  # the KV cache holds prompt + generated tokens, nothing twice


def test_text_generation_pipeline_on_an_export(tmp_path):
    tok = byte_tokenizer()
    model = tiny(["mamba", "attention"], vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    export_hf(model, tok, tmp_path)
    pipe = transformers.pipeline("text-generation", model=str(tmp_path))
    prompts = ["def f(x):", "import os\nprint("]
    outs = pipe(prompts, max_new_tokens=6, do_sample=False, batch_size=2)
    for prompt, out in zip(prompts, outs):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        expected = tok.decode(model.generate(ids, max_new_tokens=6, do_sample=False)[0])
        assert out[0]["generated_text"] == expected
        assert out[0]["generated_text"].startswith(prompt)


def test_generate_cli(tmp_path, capsys):
    tok = byte_tokenizer()
    model = tiny(["lstm", "attention"], vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    export_hf(model, tok, tmp_path / "run" / "hf")
    assert generate_main([str(tmp_path / "run"), "--prompt", "ab", "--prompt", "hello", "--max-new-tokens", "4", "--greedy"]) == 0
    texts = [tok.decode(model.generate(tok(p, return_tensors="pt")["input_ids"], max_new_tokens=4, do_sample=False)[0], skip_special_tokens=True) for p in ("ab", "hello")]
    assert capsys.readouterr().out == "".join(f"{t}\n\n" for t in texts)
    assert generate_main([str(tmp_path / "run"), "--prompt", "ab", "--prompt", "hello", "--max-new-tokens", "4", "--greedy", "--static"]) == 0
    assert capsys.readouterr().out == "".join(f"{t}\n\n" for t in texts)  # static decoding: the same tokens
    sampled = [str(tmp_path / "run" / "hf"), "--prompt", "ab", "--max-new-tokens", "6", "--seed", "3", "--top-k", "5", "--top-p", "0.9", "--temperature", "1.3"]
    assert generate_main(sampled) == 0 and generate_main(sampled) == 0
    first, again = capsys.readouterr().out.split("\n\n")[:2]
    assert first == again and first.startswith("ab")  # seeded sampling is reproducible
    assert generate_main([str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo.generate: error:") and "nope" in err
    assert generate_main([str(tmp_path / "run"), "--prompt", "x", "--temperature", "0"]) == 2
    assert "--temperature must be > 0" in capsys.readouterr().err


def test_a_decode_step_checks_only_its_own_mask_columns():
    """Continuing a cache, the left padding of the prompt stays in the mask and is allowed (each step checks its own
    columns, not all ``[B, S]``); padding in the step's own column is refused."""
    model = tiny(["attention"])
    ids = torch.randint(1, VOCAB, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0  # row 0 is left-padded
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        step = torch.randint(1, VOCAB, (2, 1))
        full = model(torch.cat([ids, step], 1), attention_mask=torch.cat([mask, mask.new_ones(2, 1)], 1)).logits[:, -1]
        logits = model(step, attention_mask=torch.cat([mask, mask.new_ones(2, 1)], 1), cache=out.past_key_values).logits
        torch.testing.assert_close(logits[:, -1], full, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="padded positions after the first call"):
            model(step, attention_mask=torch.cat([mask, torch.tensor([[1], [0]])], 1), cache=out.past_key_values)
