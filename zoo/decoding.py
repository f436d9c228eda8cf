"""Static decoding: token-by-token generation from preallocated states, optionally replayed as a CUDA graph.

``model.generate`` (Hugging Face's loop over a :class:`~zoo.modeling.ZooCache`) is the general path: its states
are new tensors at every step and the KV caches grow by concatenation. :class:`StaticDecoder` is the fast path for
one-token steps: after a normal prefill, every layer's state is copied into buffers of fixed shape (attention gets a
:class:`~zoo.layers.attention.StaticAttentionState` of ``max_length`` slots; recurrent states keep their constant
shape), and each step writes its new state into those buffers. A step then has fixed shapes, no host
synchronization and (when captured with ``cuda_graph=True``) no allocation: the CUDA graph replays the whole model.

Sampling matches Hugging Face's: logits in fp32, then temperature, top-k and top-p (in that order), then
``torch.multinomial``; greedy is the argmax. With the same seed the tokens equal ``model.generate``'s.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from zoo.errors import ZooError
from zoo.layers import map_state
from zoo.layers.moe import discard_router_stats
from zoo.modeling import ZooCache


def copy_state_(buffers: Any, new: Any) -> None:
    """Copy every tensor of state ``new`` into the matching tensor of ``buffers`` (same structure), in place."""
    if isinstance(buffers, torch.Tensor):
        if new is not buffers:
            buffers.copy_(new)
    elif isinstance(buffers, (tuple, list)):
        for b, n in zip(buffers, new):
            copy_state_(b, n)
    elif buffers is not None:
        raise TypeError(f"cannot copy a state of type {type(buffers).__name__}")


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Hugging Face's sampling warpers on fp32 ``logits [B, V]``: temperature, then top-k, then top-p
    (each skipped at its neutral value: 1.0, 0, 1.0). Filtered entries become -inf."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)  # [B, V], ascending
        remove = cumulative <= 1 - top_p
        remove[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


class StaticDecoder:
    """Generate with static state buffers for a causal zoo model (``ZooForCausalLM``), on any device.

    ``max_length`` bounds prompt + new tokens (the attention buffers' size). ``cuda_graph=True`` (CUDA only)
    captures one decode step after the prefill and replays it for every token.
    """

    def __init__(self, model: PreTrainedModel, max_length: int, cuda_graph: bool = False):
        if cuda_graph and model.device.type != "cuda":
            raise ZooError(f"StaticDecoder: cuda_graph=True needs the model on a CUDA device, it is on {model.device}")
        if max_length < 1:
            raise ZooError(f"StaticDecoder: max_length must be >= 1, got {max_length}")
        self.model = model
        self.max_length = max_length
        self.cuda_graph = cuda_graph
        self.states: list[Any] = []
        self.input_ids: torch.Tensor | None = None  # [B, 1] the token a step reads
        self.logits: torch.Tensor | None = None  # [B, V] fp32, what a step writes
        self.graph: Any = None

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt ``input_ids [B, P]`` (left-padded where ``attention_mask`` is 0) through the model and set up
        the static buffers; returns the fp32 logits ``[B, V]`` of the last position."""
        B, P = input_ids.shape
        if P >= self.max_length:
            raise ZooError(f"StaticDecoder: the prompt has {P} tokens, max_length is {self.max_length}: no room to generate")
        cache = ZooCache(len(self.model.model.layers))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True, logits_to_keep=1)
        self.states = self.model.model.static_states(cache.states, self.max_length)
        self.input_ids = torch.zeros(B, 1, dtype=torch.long, device=input_ids.device)
        last_logits = out.logits[:, -1].float()  # [B, V]
        self.logits = last_logits.clone()
        self.graph = self._capture() if self.cuda_graph else None  # its warm-up steps overwrite self.logits
        return last_logits

    def _step(self) -> None:
        """One token for every row: reads ``self.input_ids``, updates the state buffers, writes ``self.logits``."""
        model = self.model.model
        hidden = model.normed_embeddings(model.embed(self.input_ids))  # [B, 1, D]
        hidden, states = model._run_layers(hidden, self.states)
        copy_state_(self.states, states)  # a static KV cache was written in place; other states are copied
        self.logits.copy_(self.model.lm_head(model.norm(hidden))[:, -1].float())
        discard_router_stats(model.layers)

    def _capture(self) -> Any:
        """Warm up (then restore the states) and capture one step in a CUDA graph."""
        snapshot = [map_state(s, torch.clone) for s in self.states]
        stream = torch.cuda.Stream(device=self.logits.device)
        stream.wait_stream(torch.cuda.current_stream(self.logits.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.logits.device).wait_stream(stream)
        copy_state_(self.states, snapshot)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step()
        except RuntimeError as err:
            raise ZooError(
                f"StaticDecoder: a decode step of this model cannot be captured in a CUDA graph ({err}); a block that "
                "synchronizes with the host (e.g. MoE dispatch without torch._grouped_mm) needs cuda_graph=False"
            ) from err
        return graph

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed ``token_ids [B]`` (one per row); returns the fp32 logits ``[B, V]`` of the next position."""
        if self.input_ids is None:
            raise ZooError("StaticDecoder.step: call prefill first")
        self.input_ids.copy_(token_ids.view(-1, 1))
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.logits.clone()

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prompt + up to ``max_new_tokens`` new tokens ``[B, P + N]``, like ``model.generate``: rows that emitted
        ``eos_token_id`` continue with ``pad_token_id``, and the output stops once every row has finished."""
        B, P = input_ids.shape
        if P + max_new_tokens > self.max_length:
            raise ZooError(f"StaticDecoder: {P} prompt + {max_new_tokens} new tokens exceed max_length={self.max_length}")
        if eos_token_id is not None and pad_token_id is None:
            pad_token_id = eos_token_id
        logits = self.prefill(input_ids, attention_mask)
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        tokens = []
        for i in range(max_new_tokens):
            if do_sample:
                probs = process_logits(logits, temperature, top_k, top_p).softmax(-1)
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # [B]
            else:
                next_ids = logits.argmax(-1)
            if eos_token_id is not None:
                next_ids = torch.where(finished, torch.full_like(next_ids, pad_token_id), next_ids)
                finished = finished | (next_ids == eos_token_id)
            tokens.append(next_ids)
            # One host synchronization every 16 tokens to stop early, none in between.
            stop = eos_token_id is not None and i % 16 == 15 and bool(finished.all())
            if i + 1 == max_new_tokens or stop:
                break
            logits = self.step(next_ids)
        new = torch.stack(tokens, 1)  # [B, n]
        if eos_token_id is not None:
            done = (new == eos_token_id).cumsum(1) > 0  # [B, n]: finished at or before each step
            all_done = done.all(0).nonzero()
            if len(all_done):
                new = new[:, : int(all_done[0]) + 1]
        return torch.cat((input_ids, new), 1)
