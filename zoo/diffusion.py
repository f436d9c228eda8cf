"""Masked (absorbing-state) discrete diffusion, as in MDLM (Sahoo et al. 2024): noise schedules, the continuous-time
NELBO (noise schedules in :mod:`zoo.noise`) and the ancestral sampler of a :class:`~zoo.modeling.ZooForMaskedLM`. The
Lightning module that trains with it is :class:`zoo.training.DiffusionLightningModule`; nothing here imports Lightning,
so sampling a checkpoint does not.

At time ``t`` in [0, 1] each token is kept with probability ``alpha_t`` and replaced by the mask token otherwise.
The denoiser predicts the clean tokens (SUBS parametrization: never the mask token). The negative ELBO per sequence
is ``E_t [ -alpha'_t / (1 - alpha_t) * sum over masked positions of -log p(x_i | z_t) ]``; divided by the number of
tokens it bounds the negative log-likelihood per token, so ``exp`` of it bounds the perplexity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from zoo.config import DiffusionConfig, DiffusionSamplingConfig
from zoo.errors import ZooError
from zoo.noise import NoiseSchedule
from zoo.typed import build


def sample_times(batch_size: int, t_min: float, antithetic: bool = True, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Diffusion times ``[B]`` in ``[t_min, 1]``; antithetic: one uniform offset, the batch evenly spaced from it (mod 1)."""
    if antithetic:
        u = torch.rand(1, generator=generator, device=device)
        t = (u + torch.arange(batch_size, device=device) / batch_size) % 1
    else:
        t = torch.rand(batch_size, generator=generator, device=device)
    return t_min + (1 - t_min) * t


def mask_tokens(x: torch.Tensor, alpha_t: torch.Tensor, mask_id: int, protected: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward process: each token of ``x [B, T]`` is masked with probability ``1 - alpha_t [B]``, except where
    ``protected [B, T]`` (a prompt) is True. Returns ``(z_t [B, T], masked [B, T] bool)``."""
    draw = torch.rand(x.shape, generator=generator, device=x.device)
    masked = draw < (1 - alpha_t.to(x.device).float())[:, None]
    if protected is not None:
        masked &= ~protected
    return torch.where(masked, torch.full_like(x, mask_id), x), masked


def denoiser_output(model: PreTrainedModel, z: torch.Tensor, t: torch.Tensor, mask_id: int,
                    position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ModelOutput]:
    """The denoiser's fp32 logits ``[B, T, V]`` for ``z [B, T]`` at times ``t [B]``, the mask token made impossible,
    and its whole output (MoE router losses). ``position_ids``: packed documents (each denoised apart)."""
    out = model(input_ids=z, timesteps=t, **({} if position_ids is None else {"position_ids": position_ids}))
    logits = out.logits.float()
    logits[..., mask_id] = float("-inf")
    return logits, out


def diffusion_nelbo(model: PreTrainedModel, x: torch.Tensor, schedule: NoiseSchedule, mask_id: int, t: torch.Tensor,
                    protected: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ModelOutput]:
    """One-sample estimate of the NELBO per token (nats) of clean tokens ``x [B, T]`` at times ``t [B]``, and the
    denoiser's output it came from (a training step adds its MoE router loss). ``position_ids``: packed documents,
    each denoised as its own sequence (``data.packing: documents``).

    Only masked positions contribute, each with weight ``-alpha'_t / (1 - alpha_t)``; the sum is divided by the number
    of unprotected tokens, so it compares with a causal LM's mean cross-entropy on the same tokens.
    """
    z, masked = mask_tokens(x, schedule.alpha(t), mask_id, protected, generator)
    logits, out = denoiser_output(model, z, t, mask_id, position_ids)
    nll = F.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="none").view_as(x)  # [B, T]
    weighted = schedule.loss_weight(t).float()[:, None] * torch.where(masked, nll, torch.zeros_like(nll))
    n_tokens = x.numel() if protected is None else int((~protected).sum())
    return weighted.sum() / max(n_tokens, 1), out


# ------------------------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------------------------


def diffusion_config(model: PreTrainedModel) -> DiffusionConfig:
    """The typed diffusion settings a :class:`ZooForMaskedLM` was trained with."""
    if getattr(model.config, "diffusion", None) is None:
        raise ZooError(f"{type(model).__name__} has no diffusion settings in its config (config.diffusion); not a ZooForMaskedLM?")
    return build(DiffusionConfig, dict(model.config.diffusion), "config.diffusion")


@torch.no_grad()
def denoise(model: PreTrainedModel, tokens: torch.Tensor, steps: int, schedule: NoiseSchedule, mask_id: int,
            unmasking: str = "ancestral", temperature: float = 1.0, time_conditioned: bool = False,
            generator: torch.Generator | None = None, history: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, int]:
    """Ancestral sampling (MDLM) from ``t = 1`` to ``0`` in ``steps`` steps: every mask token of ``tokens [B, L]`` is
    filled in, every other token is left as it is (prompts, context). Returns ``(tokens, denoiser calls)``.

    From ``t`` to ``s < t`` a masked position is revealed with probability ``(alpha_s - alpha_t) / (1 - alpha_t)``
    (``ancestral``), or exactly the expected number of masked positions, chosen uniformly, is revealed
    (``fixed_count``: with the loglinear schedule and ``steps`` = number of masks, one per step). A revealed position
    takes a token drawn from the denoiser. Without time conditioning the denoiser's output depends only on the tokens,
    so when a step reveals nothing the previous output is reused (MDLM's cache). ``history``, when given, receives
    a copy of the tokens after every step.
    """
    x = tokens.clone()
    B = x.shape[0]
    grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    initial_masked = (x == mask_id).sum(1)  # [B]
    probs, calls = None, 0
    for k in range(steps):
        t, s = grid[k], grid[k + 1]
        masked = x == mask_id  # [B, L]
        if not masked.any():
            break
        if probs is None or time_conditioned:
            logits = denoiser_output(model, x, torch.full((B,), float(t), device=x.device), mask_id)[0]
            probs = torch.softmax(logits / temperature, dim=-1)  # [B, L, V]
            calls += 1
        alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(s)
        draw = torch.rand(x.shape, generator=generator, device=x.device)
        if unmasking == "ancestral":
            reveal = masked & (draw < float((alpha_s - alpha_t) / (1 - alpha_t)))
        elif unmasking == "fixed_count":
            # Keep round(initial * (1 - alpha_s) / (1 - alpha_1)) positions masked; reveal the rest, uniformly at random.
            keep = torch.round(initial_masked.double() * float((1 - alpha_s) / (1 - schedule.alpha(grid[0])))).long()
            n_reveal = (masked.sum(1) - keep.to(x.device)).clamp(min=0)  # [B]
            rank = torch.where(masked, draw, torch.full_like(draw, 2.0)).argsort(1).argsort(1)  # [B, L]: 0 = first to reveal
            reveal = masked & (rank < n_reveal[:, None])
        else:
            raise ValueError(f"unknown unmasking '{unmasking}'; use ancestral or fixed_count")
        if reveal.any():
            drawn = torch.multinomial(probs[reveal], 1, generator=generator).squeeze(-1)
            x[reveal] = drawn
            probs = None
        if history is not None:
            history.append(x.clone())
    return x, calls


@torch.no_grad()
def generate_ids(model: PreTrainedModel, prompt_ids: torch.Tensor, length: int, steps: int, context_length: int,
                 block_length: int | None = None, unmasking: str = "ancestral", temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``prompt_ids [B, P]`` followed by ``length`` sampled tokens. When they do not fit in ``context_length``, the
    new tokens come in semi-autoregressive blocks of ``block_length``, each denoised in ``steps`` steps given the
    last ``context_length - block_length`` tokens before it."""
    settings = diffusion_config(model)
    schedule = NoiseSchedule(settings.schedule, settings.eps)
    mask_id = model.config.mask_token_id
    kwargs = dict(unmasking=unmasking, temperature=temperature, time_conditioned=model.model.conditioned, generator=generator)
    out = prompt_ids
    B, P = prompt_ids.shape
    if P + length <= context_length:
        blocks = [length]
    else:
        block = min(block_length or max(1, context_length // 2), context_length)
        blocks = [block] * (length // block) + ([length % block] if length % block else [])
    for n in blocks:
        context = out[:, max(0, out.shape[1] - (context_length - n)):] if context_length > n else out[:, :0]
        masks = torch.full((B, n), mask_id, dtype=out.dtype, device=out.device)
        x, _ = denoise(model, torch.cat((context, masks), 1), steps, schedule, mask_id, **kwargs)
        out = torch.cat((out, x[:, context.shape[1]:]), 1)
    return out


@torch.no_grad()
def sample_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: str | list[str], steps: int | None = None,
                length: int | None = None, block_length: int | None = None, unmasking: str | None = None,
                temperature: float | None = None, context_length: int | None = None, seed: int | None = None) -> list[str]:
    """Sample a continuation of each prompt from a masked-diffusion :class:`ZooForMaskedLM`; returns prompt + continuation.

    Unset arguments take the model's ``diffusion.sampling`` defaults (saved in its config). Each prompt is preceded by
    the tokenizer's BOS token (a document boundary in zoo's corpora); prompts of different lengths run separately.
    """
    defaults: DiffusionSamplingConfig = diffusion_config(model).sampling
    steps = steps or defaults.steps
    length = length or defaults.length
    context_length = context_length or defaults.context_length
    if context_length is None:
        raise ZooError("sample_text: pass context_length (the model's config has no diffusion.sampling.context_length)")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    texts: list[str | None] = [None] * len(prompts)
    for n in sorted({len(ids) for ids in encoded}):
        rows = [i for i, ids in enumerate(encoded) if len(ids) == n]
        prompt_ids = torch.tensor([encoded[i] for i in rows], dtype=torch.long, device=model.device)
        out = generate_ids(
            model, prompt_ids, length, steps, context_length,
            block_length or defaults.block_length, unmasking or defaults.unmasking,
            temperature or defaults.temperature, generator,
        )
        for i, ids in zip(rows, out.tolist()):
            texts[i] = tokenizer.decode(ids, skip_special_tokens=True)
    model.train(was_training)
    return texts
