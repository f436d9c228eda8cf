"""Static decoding (zoo.decoding): preallocated state buffers give the same tokens as ``model.generate`` for every
block and hybrid, greedy and sampled, with left padding and EOS; steps write into fixed buffers; CUDA graphs on GPU."""
import contextlib

import pytest
import torch

from test_generate import IDS, MODELS, PAD, VOCAB, greedy, tiny
from zoo.layers import MIXERS
from zoo.decoding import StaticDecoder, copy_state_, process_logits
from zoo.errors import ZooError
from zoo.layers import map_state
from zoo.layers.attention import StaticAttentionState


def left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((width - len(p),), PAD), p]) for p in prompts])  # [B, width]
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    return ids, mask


@pytest.mark.parametrize("blocks, ffn", MODELS, ids=IDS)
def test_static_greedy_equals_generate_with_left_padding(blocks, ffn):
    model = tiny(blocks, ffn)
    ids, mask = left_padded([torch.randint(1, VOCAB, (n,)) for n in (3, 6)])
    expected = greedy(model, ids, 7, attention_mask=mask)
    got = StaticDecoder(model, max_length=16).generate(ids, mask, max_new_tokens=7)
    assert torch.equal(got, expected)


def test_static_sampling_equals_hf_sampling_with_the_same_seed():
    model = tiny(["attention", "mamba2"])
    prompt = torch.randint(1, VOCAB, (3, 4))
    for kw in ({"temperature": 1.3, "top_k": 0}, {"top_k": 5}, {"top_p": 0.8, "top_k": 0}, {"temperature": 0.7, "top_k": 10, "top_p": 0.9}):
        torch.manual_seed(11)
        expected = model.generate(prompt, max_new_tokens=8, do_sample=True, eos_token_id=None, pad_token_id=PAD, **kw)
        torch.manual_seed(11)
        got = StaticDecoder(model, max_length=12).generate(prompt, max_new_tokens=8, do_sample=True, **kw)
        assert torch.equal(got, expected), kw


def test_eos_pads_finished_rows_and_stops_like_generate():
    model = tiny(["rwkv7", "attention"], "rwkv_cmix")
    prompt = torch.randint(1, VOCAB, (2, 5))
    free = greedy(model, prompt, 12)
    eos = int(free[0, 7])  # row 0 emits it at its 3rd new token
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    got = StaticDecoder(model, max_length=20).generate(prompt, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(got, expected)


def test_steps_write_into_the_same_buffers():
    """After the prefill no state tensor is replaced: attention writes its slot in place, recurrent blocks copy
    their new state into the buffers; the KV buffers never grow."""
    model = tiny(["attention", "mamba"], "rwkv_cmix")
    decoder = StaticDecoder(model, max_length=10)
    logits = decoder.prefill(torch.randint(1, VOCAB, (2, 4)))
    attn = decoder.states[0][0]
    assert isinstance(attn, StaticAttentionState) and attn.k.shape[2] == 10 and int(attn.length) == 4
    pointers = [t.data_ptr() for t in _tensors(decoder.states)]
    for _ in range(3):
        logits = decoder.step(logits.argmax(-1))
    assert [t.data_ptr() for t in _tensors(decoder.states)] == pointers
    assert int(attn.length) == 7 and attn.key_mask[:, :7].all() and not attn.key_mask[:, 7:].any()
    assert attn.next_positions.tolist() == [7, 7]


def _tensors(state):
    if isinstance(state, torch.Tensor):
        return [state]
    return [t for part in state for t in _tensors(part)] if isinstance(state, (tuple, list)) else []


def test_errors_name_the_problem():
    model = tiny(["attention"])
    with pytest.raises(ZooError, match="exceed max_length=8"):
        StaticDecoder(model, max_length=8).generate(torch.randint(1, VOCAB, (1, 5)), max_new_tokens=4)
    with pytest.raises(ZooError, match="call prefill first"):
        StaticDecoder(model, max_length=8).step(torch.tensor([1]))
    if not torch.cuda.is_available():
        with pytest.raises(ZooError, match="CUDA device"):
            StaticDecoder(model, max_length=8, cuda_graph=True)


def test_process_logits_matches_hf_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 30)
    expected = TopPLogitsWarper(0.7)(None, TopKLogitsWarper(9)(None, TemperatureLogitsWarper(0.8)(None, logits.clone())))
    torch.testing.assert_close(process_logits(logits, 0.8, 9, 0.7), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("blocks", [[name] for name in MIXERS.names()] + [["mamba2", "attention"]])
def test_cuda_graph_decode_equals_generate_and_allocates_nothing(blocks):
    model = tiny(blocks).cuda()
    ids, mask = left_padded([torch.randint(1, VOCAB, (n,)) for n in (5, 9)])
    ids, mask = ids.cuda(), mask.cuda()
    expected = greedy(model, ids, 16, attention_mask=mask)
    decoder = StaticDecoder(model, max_length=32, cuda_graph=True)
    assert torch.equal(decoder.generate(ids, mask, max_new_tokens=16), expected)
    logits = decoder.prefill(ids, mask)
    token = logits.argmax(-1)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(8):
        decoder.input_ids.copy_(token[:, None])
        decoder.graph.replay()
        token = decoder.logits.argmax(-1, keepdim=False)
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()["allocation.all.allocated"]
    assert after - before <= 8 * 2  # only the argmax outputs outside the graph; the replayed steps allocate nothing


class _FakeCuda:
    """Stand-ins for the torch.cuda calls of ``StaticDecoder._capture``, with CUDA-graph semantics on CPU: capturing
    records the step without running it (the states are put back on exit), ``replay`` runs the recorded step."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.captures = 0
        fake = self

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        class CUDAGraph:
            def replay(self):
                fake.decoder._step()

        class Graph:
            def __init__(self, graph):
                pass

            def __enter__(self):
                fake.captures += 1
                self.saved = [map_state(s, torch.clone) for s in fake.decoder.states], fake.decoder.logits.clone()

            def __exit__(self, *exc):
                copy_state_(fake.decoder.states, self.saved[0])
                fake.decoder.logits.copy_(self.saved[1])

        self.Stream, self.CUDAGraph, self.graph = Stream, CUDAGraph, Graph
        self.current_stream = lambda device=None: Stream()
        self.stream = lambda stream: contextlib.nullcontext()


def test_cuda_graph_capture_logic_with_stand_ins(monkeypatch):
    """The capture path on CPU: warm-up steps must leave no trace (states restored, prefill logits returned) and
    every replayed step must give generate's tokens. Real capture is the GPU test's job."""
    model = tiny(["attention", "mamba"], "rwkv_cmix")
    ids, mask = left_padded([torch.randint(1, VOCAB, (n,)) for n in (4, 7)])
    expected = greedy(model, ids, 9, attention_mask=mask)
    decoder = StaticDecoder(model, max_length=20)
    decoder.cuda_graph = True
    fake = _FakeCuda(decoder)
    for name in ("Stream", "CUDAGraph", "graph", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    assert torch.equal(decoder.generate(ids, mask, max_new_tokens=9), expected)
    assert fake.captures == 1 and decoder.graph is not None
