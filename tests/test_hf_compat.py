"""zoo models under the installed transformers version (CI runs this file on the newest and on the oldest supported
one): the decoding cache's name, continuation from a returned cache, assisted and prompt-lookup decoding,
``attn_implementation`` and ``torch.export``."""
import logging

import pytest
import torch
import transformers
from transformers.utils import logging as hf_logging

from test_blocks import TEST_ARGS
from test_generate import IDS, MODELS, PAD, VOCAB, greedy, tiny
from zoo.config import ModelConfig
from zoo.modeling import CACHE_FIELD, RECURRENT_ROLLBACK, ZooCache, ZooCacheLayer, ZooConfig, ZooForCausalLM, output_cache


def test_cache_field_follows_the_installed_transformers():
    fields = transformers.modeling_outputs.CausalLMOutputWithPast.__dataclass_fields__
    assert CACHE_FIELD in fields
    model = tiny(["attention", "mamba"])
    out = model(torch.randint(1, VOCAB, (1, 5)), use_cache=True)
    assert isinstance(output_cache(out), ZooCache) and output_cache(out).get_seq_length() == 5


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_forward_takes_the_cache_under_either_name(name):
    model = tiny(["attention", "rwkv6"])
    ids = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = output_cache(model(ids[:, :6], use_cache=True))
        rest = model(ids[:, 6:], use_cache=True, **{name: cache}).logits
    torch.testing.assert_close(rest, full[:, 6:], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 9


def test_two_different_caches_are_refused():
    model = tiny(["attention"])
    with pytest.raises(ValueError, match="pass the decoding cache once"):
        model(torch.randint(1, VOCAB, (1, 3)), cache=ZooCache(2), past_key_values=ZooCache(2))


@pytest.mark.parametrize("blocks, ffn", MODELS, ids=IDS)
def test_generate_continues_from_the_returned_cache(blocks, ffn):
    """generate(n) then generate(m) from the returned cache == one generate(n + m), and no deprecated-name warning."""
    model = tiny(blocks, ffn)
    prompt = torch.randint(1, VOCAB, (1, 5))
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    hf_logging.get_logger().addHandler(handler)
    try:
        whole = greedy(model, prompt, 7)
        first = greedy(model, prompt, 3, return_dict_in_generate=True)
        cache = output_cache(first)
        assert cache.get_seq_length() == prompt.shape[1] + 2  # the last token is not fed yet
        second = greedy(model, first.sequences, 4, **{CACHE_FIELD: cache})
    finally:
        hf_logging.get_logger().removeHandler(handler)
    assert torch.equal(second, whole)
    assert not [m for m in messages if "deprecated" in m], messages


# Every block alone and the hybrids of test_generate, plus short convolutions before a recurrent and an attention block.
ROLLBACK_MODELS = MODELS + [(["mamba2", "attention"], "swiglu", {"mamba2": 4, "attention": 3})]
ROLLBACK_IDS = IDS + ["mamba2+attention/short_conv"]


def build(blocks, ffn, short_conv=None):
    """test_generate's tiny model, with ``short_conv`` kernels ({block: K}) when given."""
    if not short_conv:
        return tiny(blocks, ffn)
    args = {name: {**TEST_ARGS.get(name, {}), "short_conv": k} for name, k in short_conv.items()}
    spec = ModelConfig.from_dict({"d_model": 48, "n_layers": max(2, len(blocks)), "blocks": list(blocks), "ffn": ffn, "vocab_size": VOCAB, **args})
    torch.manual_seed(0)
    return ZooForCausalLM(ZooConfig.from_model_config(spec)).eval()


def run_greedy(model, ids, **kw):
    # An eos id (transformers 5.0's assisted decoding needs one); the prompts never hold it and the references stop alike.
    return model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=PAD, pad_token_id=PAD, **kw)


@pytest.mark.parametrize("model_args", ROLLBACK_MODELS, ids=ROLLBACK_IDS)
def test_assisted_and_prompt_lookup_decoding_equal_greedy(model_args, monkeypatch):
    """Drafts from an assistant with other weights, and prompt look-up drafts from a repeated prompt, get rejected
    and the cache rolls back: KV caches are cut, recurrent states (transformers >= 5.25) return to recorded ones.
    The tokens equal plain greedy decoding. Before 5.25 a model with a recurrent state is refused."""
    blocks, ffn, *short_conv = model_args
    model = build(blocks, ffn, *short_conv)
    assistant = build(blocks, ffn, *short_conv)
    assistant.model.embed.weight.data.normal_()  # same architecture, other weights
    prompt = torch.randint(1, VOCAB, (1, 6))
    repeated = torch.cat([prompt, prompt], 1)  # n-grams to look up
    recurrent = not all(layer.state_can_roll_back for layer in model.model.layers)
    if recurrent and not RECURRENT_ROLLBACK:
        assert model._is_stateful
        with pytest.raises(ValueError, match="stateful"):
            run_greedy(model, repeated, prompt_lookup_num_tokens=3)
        return
    assert not model._is_stateful
    restored = []
    roll_back = ZooCacheLayer.roll_back

    def counting_roll_back(layer, remove, keep):
        if remove and not layer.state_can_crop:
            restored.append(remove)
        roll_back(layer, remove, keep)

    monkeypatch.setattr(ZooCacheLayer, "roll_back", counting_roll_back)
    assert torch.equal(run_greedy(model, prompt, assistant_model=assistant), run_greedy(model, prompt))
    assert torch.equal(run_greedy(model, repeated, prompt_lookup_num_tokens=3), run_greedy(model, repeated))
    assert bool(restored) == recurrent  # recorded states were restored exactly when a layer's state cannot be cut


def test_crop_of_a_recurrent_cache_names_the_state_and_changes_nothing():
    model = tiny(["mamba", "attention"])
    cache = output_cache(model(torch.randint(1, VOCAB, (1, 4)), use_cache=True))
    assert not cache.is_croppable
    states = cache.states
    with pytest.raises(ValueError, match="layer 0 cannot drop its last 1 tokens: its MambaState .* cannot roll back"):
        cache.crop(-1)
    assert cache.get_seq_length() == 4 and all(a is b for a, b in zip(cache.states, states))


def test_recorded_states_roll_back_a_verify_step_exactly():
    """With recording on, a call over 5 tokens then one more token: crop(-n) for every n up to 6 equals a cache that
    never saw those tokens (same next logits: the state before the dropped token, replayed where inside a call);
    dropping more than was recorded since recording began is refused, naming the layer, and changes nothing."""
    model = tiny(["rwkv7", "attention"], "rwkv_cmix")
    ids = torch.randint(1, VOCAB, (1, 10))
    with torch.no_grad():
        for remove in range(7):
            cache = output_cache(model(ids[:, :4], use_cache=True))
            cache.activate_past_recording(recurrent_states_to_keep=3)
            assert cache.is_croppable and cache.get_recurrent_states_to_keep() == 3
            model(ids[:, 4:9], use_cache=True, **{CACHE_FIELD: cache})
            model(ids[:, 9:10], use_cache=True, **{CACHE_FIELD: cache})
            cache.crop(-remove)
            assert cache.get_seq_length() == 10 - remove
            nxt = torch.randint(1, VOCAB, (1, 1))
            got = model(nxt, use_cache=True, **{CACHE_FIELD: cache}).logits
            want = model(torch.cat([ids[:, : 10 - remove], nxt], 1), use_cache=False).logits[:, -1:]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        cache = output_cache(model(ids[:, :4], use_cache=True))
        cache.activate_past_recording(recurrent_states_to_keep=2)
        model(ids[:, 4:], use_cache=True, **{CACHE_FIELD: cache})
        states = cache.states
        with pytest.raises(ValueError, match=r"layer 0 cannot drop its last 7 tokens: it recorded 6 tokens since recording began"):
            cache.crop(-7)
        assert cache.get_seq_length() == 10 and all(a is b for a, b in zip(cache.states, states))


def test_crop_keeps_a_prefix_of_the_kv_cache():
    model = tiny(["attention"])
    ids = torch.randint(1, VOCAB, (1, 8))
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))
        cache.crop(-3)  # transformers >= 5.24: tokens to remove
        assert cache.get_seq_length() == 5 and cache.states[0].k.shape[2] == 5
        cache.crop(4)  # earlier transformers: the length to keep
        assert cache.get_seq_length() == 4
        rest = model(ids[:, 4:], use_cache=True, **{CACHE_FIELD: cache}).logits
        torch.testing.assert_close(rest, model(ids, use_cache=False).logits[:, 4:], atol=1e-5, rtol=1e-5)


def test_attn_implementation_sets_and_reports_the_attention_backend(tmp_path):
    model = tiny(["lstm", "attention"])
    assert model.config._attn_implementation == "sdpa"  # backend auto runs SDPA here (no flash-attn installed)
    model.save_pretrained(tmp_path)
    load = transformers.AutoModelForCausalLM.from_pretrained
    ids = torch.randint(1, VOCAB, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
        for name, backend in [("sdpa", "auto"), ("eager", "eager")]:
            loaded = load(tmp_path, attn_implementation=name)
            assert loaded.config._attn_implementation == name
            assert loaded.model.layers[1].mixer.backend == backend
            torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
        loaded.set_attn_implementation("sdpa")
        assert loaded.model.layers[1].mixer.backend == "sdpa" and loaded.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="zoo's attention runs"):
        load(tmp_path, attn_implementation="paged|sdpa")
    # flash-attn is not installed here: transformers refuses (ImportError; 5.0 fails reading its version, a ValueError)
    with pytest.raises((ImportError, ValueError)):
        load(tmp_path, attn_implementation="flash_attention_2")


def test_torch_export_with_a_dynamic_sequence_length():
    model = tiny(["attention"])

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    seq = torch.export.Dim("seq", min=2, max=256)
    exported = torch.export.export(Logits(model), (torch.randint(1, VOCAB, (2, 9)),), dynamic_shapes={"input_ids": {1: seq}})
    longer = torch.randint(1, VOCAB, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(longer), model(longer).logits, atol=1e-5, rtol=1e-5)


def test_checkpoints_written_before_the_model_spec_change_load_unchanged():
    """tests/data/e5e32dd: a causal hybrid and a time-conditioned masked-diffusion model saved by zoo at commit e5e32dd
    (time_conditioning then lived in config.diffusion), with their logits; both load and give the same logits."""
    import json
    from pathlib import Path

    from zoo.modeling import ZooForMaskedLM

    data = Path(__file__).parent / "data" / "e5e32dd"
    expected = json.loads((data / "expected_logits.json").read_text())
    ids, t = torch.tensor(expected["input_ids"]), torch.tensor(expected["timesteps"])
    causal = transformers.AutoModelForCausalLM.from_pretrained(data / "causal_mamba_attention").eval()
    denoiser = ZooForMaskedLM.from_pretrained(data / "diffusion_time_conditioned").eval()
    assert denoiser.model.conditioned and denoiser.time_embed is not None
    # upgrade(): time_conditioning left config.diffusion for the model field, so saving writes today's form
    assert denoiser.config.time_conditioning and "time_conditioning" not in denoiser.config.diffusion
    with torch.no_grad():
        torch.testing.assert_close(causal(ids).logits, torch.tensor(expected["causal_logits"]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(denoiser(input_ids=ids, timesteps=t).logits, torch.tensor(expected["denoiser_logits"]), atol=1e-5, rtol=1e-5)
