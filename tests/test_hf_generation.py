"""The behaviours transformers' ``GenerationTesterMixin`` checks (it is not in transformers' source distribution),
tested on zoo: ``return_dict_in_generate`` outputs with scores, logits, hidden states and attentions for greedy,
sampling and beam search; continuation from the returned cache and from ``inputs_embeds``; the cache as a
transformers ``Cache`` (layer keys/values, update, reorder, crop, reset); ``cache_implementation="static"``;
``shift_labels`` and ``logits_to_keep``."""
import pytest
import torch
from transformers.cache_utils import Cache

from test_generate import PAD, VOCAB, greedy, tiny
from zoo.layers import FFNS, MIXERS
from zoo.layers.attention import AttentionState, StaticAttentionState
from zoo.modeling import CACHE_FIELD, ZooCache, output_cache

# Every block alone (SwiGLU FFN), every other FFN after attention (MoE, the stateful RWKV channel mixes), a hybrid.
CONFIGS = {
    **{name: ([name], "swiglu") for name in MIXERS.names()},
    **{ffn: (["attention"], ffn) for ffn in FFNS.names() if ffn != "swiglu"},
    "hybrid": (["mamba2", "attention"], "swiglu"),
}
MODES = {
    "greedy": {"do_sample": False},
    "sample": {"do_sample": True, "top_k": 0},
    "beam": {"do_sample": False, "num_beams": 2},
}


def dict_generate(model, prompt, n, **kw):
    return model.generate(
        prompt, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=PAD, return_dict_in_generate=True,
        output_scores=True, output_logits=True, output_hidden_states=True, output_attentions=True, **kw,
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", CONFIGS)
def test_dict_outputs_hold_scores_logits_hidden_states_and_attentions(config, mode):
    blocks, ffn = CONFIGS[config]
    model = tiny(blocks, ffn)
    B, P, N = 2, 5, 3
    prompt = torch.randint(1, VOCAB, (B, P))
    torch.manual_seed(3)
    out = dict_generate(model, prompt, N, **MODES[mode])
    rows = B * MODES[mode].get("num_beams", 1)
    n_layers, n_attention = len(model.model.layers), sum(b == "attention" for b in model.config.model_config().layer_blocks())
    assert out.sequences.shape == (B, P + N)
    assert len(out.scores) == len(out.logits) == len(out.hidden_states) == len(out.attentions) == N
    for step in range(N):
        width = P if step == 0 else 1  # the prompt, then one token per step
        assert out.scores[step].shape == out.logits[step].shape == (rows, VOCAB)
        assert len(out.hidden_states[step]) == n_layers + 1
        assert all(h.shape == (rows, width, model.config.d_model) for h in out.hidden_states[step])
        assert len(out.attentions[step]) == n_attention
        assert all(a.shape == (rows, 4, width, P + step) for a in out.attentions[step])
    # The raw logits are the model's: a forward over the sequence gives them, and its last hidden state too.
    with torch.no_grad():
        full = model(out.sequences[:, :-1], output_hidden_states=True, use_cache=False)
    if mode == "beam":
        assert out.sequences_scores.shape == (B,) and out.beam_indices.shape[0] == B
        return
    for step in range(N):
        torch.testing.assert_close(out.logits[step], full.logits[:, P - 1 + step], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.hidden_states[0][-1], full.hidden_states[-1][:, :P], atol=1e-4, rtol=1e-4)
    if mode == "greedy":
        assert torch.equal(torch.stack(out.scores, 1).argmax(-1), out.sequences[:, P:])


@pytest.mark.parametrize("config", CONFIGS)
def test_generate_from_inputs_embeds_and_continue_from_its_cache(config):
    """generate(inputs_embeds) returns the new tokens generate(input_ids) gives; continuing from its cache with the
    embeddings of prompt + new tokens gives the tokens of one longer generate."""
    blocks, ffn = CONFIGS[config]
    model = tiny(blocks, ffn)
    prompt = torch.randint(1, VOCAB, (2, 5))
    embeds = model.get_input_embeddings()(prompt)
    whole = greedy(model, prompt, 5)
    first = greedy(model, None, 2, inputs_embeds=embeds, return_dict_in_generate=True)
    assert torch.equal(first.sequences, whole[:, 5:7])
    cache = output_cache(first)
    assert isinstance(cache, Cache) and cache.get_seq_length() == 6
    more = torch.cat([embeds, model.get_input_embeddings()(first.sequences)], 1)  # [2, 7, D]
    second = greedy(model, None, 3, inputs_embeds=more, **{CACHE_FIELD: cache})
    assert torch.equal(second, whole[:, 7:])


@pytest.mark.parametrize("config", CONFIGS)
def test_beam_scores_are_the_log_probabilities_of_the_beams(config):
    """Every returned beam's score (length_penalty 0: the sum of its tokens' log-probabilities) equals a forward's:
    the cache's rows followed their beams through every reorder."""
    model = tiny(*CONFIGS[config])
    prompt = torch.randint(1, VOCAB, (2, 4))
    out = greedy(model, prompt, 5, num_beams=3, num_return_sequences=3, length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape == (6, 9) and len({tuple(s.tolist()) for s in out.sequences[:3]}) == 3
    with torch.no_grad():
        logprobs = model(out.sequences[:, :-1], use_cache=False).logits[:, 3:].float().log_softmax(-1)  # [6, 5, V]
    expected = logprobs.gather(-1, out.sequences[:, 4:, None]).sum((1, 2))
    torch.testing.assert_close(out.sequences_scores, expected, atol=1e-4, rtol=1e-4)


def test_the_cache_is_a_transformers_cache_with_dynamic_cache_apis():
    model = tiny(["mamba2", "attention"], "swiglu")
    ids = torch.randint(1, VOCAB, (3, 6))
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))
    assert isinstance(cache, Cache) and len(cache) == len(model.model.layers)
    assert cache.get_seq_length() == 6 and cache.get_mask_sizes(1, 1) == (7, 0) and cache.get_max_length() == -1
    attention = cache.layers[1]
    assert attention.keys.shape == (3, 2, 6, 12) and attention.values.shape == (3, 2, 6, 12)
    assert cache.layers[0].keys is None  # a Mamba-2 state is no KV cache
    keys, values = cache.update(torch.ones(3, 2, 1, 12), torch.zeros(3, 2, 1, 12), 1)
    assert keys.shape == (3, 2, 7, 12) and bool((values[:, :, -1] == 0).all())
    before = [t.clone() for t in cache.layers[0].state]
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    for new, old in zip(cache.layers[0].state, before):
        assert torch.equal(new[0], old[2]) and torch.equal(new[2], old[0])
    cache.batch_repeat_interleave(2)
    assert cache.layers[1].keys.shape[0] == 6 and cache.layers[0].max_batch_size == 6
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert cache.layers[1].keys.shape[0] == 2
    with pytest.raises(ValueError, match="not a growing KV cache"):
        cache.update(torch.ones(2, 2, 1, 12), torch.ones(2, 2, 1, 12), 0)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.states == [None, None]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("num_beams", [1, 2])
def test_static_cache_implementation_equals_the_dynamic_cache(config, num_beams):
    model = tiny(*CONFIGS[config])
    prompt = torch.randint(1, VOCAB, (2, 5))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # a left-padded row
    dynamic = greedy(model, prompt, 6, attention_mask=mask, num_beams=num_beams, return_dict_in_generate=True)
    static = greedy(model, prompt, 6, attention_mask=mask, num_beams=num_beams, cache_implementation="static", return_dict_in_generate=True)
    assert torch.equal(static.sequences, dynamic.sequences)
    cache = output_cache(static)
    assert cache.is_static and cache.get_max_length() == 10  # prompt + new tokens, less the last (never fed)
    kv = [s for s in cache.states if isinstance(s, (AttentionState, StaticAttentionState))] + [
        s[0] for s in cache.states if isinstance(s, tuple) and isinstance(s[0], StaticAttentionState)
    ]
    assert all(isinstance(s, StaticAttentionState) and s.k.shape[2] == cache.get_max_length() for s in kv)


def test_unknown_cache_implementation_is_refused():
    with pytest.raises(ValueError, match="'static' or 'dynamic'"):
        greedy(tiny(["attention"]), torch.randint(1, VOCAB, (1, 3)), 2, cache_implementation="offloaded")


def test_shift_labels_and_logits_to_keep():
    model = tiny(["attention"])
    ids = torch.randint(1, VOCAB, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)  # position t predicts token t + 1
        torch.testing.assert_close(model(ids, shift_labels=shifted).loss, out.loss)
        expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum") / 5
        torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=5).loss, expected)
        torch.testing.assert_close(model(ids, logits_to_keep=3).logits, out.logits[:, -3:])
        torch.testing.assert_close(model(ids, logits_to_keep=torch.tensor([0, 4])).logits, out.logits[:, [0, 4]])


def test_return_dict_false_is_the_outputs_non_none_fields():
    model = tiny(["mamba2", "attention"], "moe")
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        as_dict = model(ids, labels=ids, output_hidden_states=True)
        as_tuple = model(ids, labels=ids, output_hidden_states=True, return_dict=False)
    fields = [name for name, value in as_dict.items()]
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(fields) and fields[:3] == ["loss", "aux_loss", "logits"]
    for name, value, from_tuple in zip(fields, as_dict.values(), as_tuple):
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(from_tuple, value, msg=name)
        elif name == "hidden_states":
            assert len(from_tuple) == len(value) == 3
        else:
            assert type(from_tuple) is type(value), name


@pytest.mark.parametrize("config", ["attention", "hybrid"])
def test_decode_step_over_a_static_cache_compiles_without_graph_breaks(config):
    """torch.compile(fullgraph=True) of one-token steps over a static ZooCache: no graph break, generate's tokens.
    (The eager backend checks the capture; inductor compiles the same graph, which costs CPU minutes in CI.)"""
    torch._dynamo.reset()
    model = tiny(*CONFIGS[config])
    prompt = torch.randint(1, VOCAB, (1, 5))
    expected = greedy(model, prompt, 4)
    step = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        cache = ZooCache(len(model.model.layers), max_length=16)
        tokens = [model(prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)]
        for _ in range(3):
            tokens.append(step(tokens[-1], cache=cache, use_cache=True).logits[:, -1:].argmax(-1))
    assert cache.is_static and torch.equal(torch.cat([prompt, *tokens], 1), expected)
