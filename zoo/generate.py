"""``python -m zoo.generate CHECKPOINT --prompt TEXT [--prompt TEXT ...] [options]``: print continuations.

CHECKPOINT is a Hugging Face directory written by ``zoo.train`` (``<output_dir>/hf``), or the run directory that
holds it. Several prompts run as one left-padded batch. Options: ``--max-new-tokens N`` (default 64),
``--temperature T`` (default 1.0), ``--top-k K`` (default 50; 0 disables), ``--top-p P`` (default 1.0),
``--greedy`` (argmax decoding; ignores the sampling options), ``--seed S`` (default 0),
``--static`` (decode from preallocated states with :class:`zoo.decoding.StaticDecoder`; same tokens),
``--cuda-graph`` (``--static`` with every decode step replayed as a CUDA graph; CUDA only).
Each prompt's text (prompt + continuation) is printed followed by a blank line.
A masked-diffusion checkpoint (a ZooForMaskedLM: its config has ``diffusion`` settings) is sampled with
``zoo.diffusion.sample_text`` instead: ``--max-new-tokens`` new tokens, ``--diffusion-steps K`` denoising steps
(default: the recipe's), ``--temperature`` and ``--seed`` apply; top-k/top-p do not, and ``--greedy`` is refused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from zoo.cli import ArgumentParser, run_main
from zoo.errors import ZooError


def resolve_checkpoint(path: str | Path) -> Path:
    """The Hugging Face directory of ``path``: itself if it holds a config.json, else its ``hf/`` subdirectory."""
    path = Path(path)
    for candidate in (path, path / "hf"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ZooError(f"'{path}' holds no Hugging Face checkpoint (no config.json in it or in {path / 'hf'})")


@torch.no_grad()
def generate_causal(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    seed: int = 0,
    static: bool = False,
    cuda_graph: bool = False,
) -> list[str]:
    """Continue each prompt with a causal LM: prompt + continuation texts. ``model.generate`` over a ZooCache, or
    with ``static``/``cuda_graph`` a :class:`~zoo.decoding.StaticDecoder` (the same tokens for the same seed)."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    sampling = {} if greedy else {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    torch.manual_seed(seed)
    if static or cuda_graph:
        from zoo.decoding import StaticDecoder

        eos = model.generation_config.eos_token_id
        decoder = StaticDecoder(model, batch["input_ids"].shape[1] + max_new_tokens, cuda_graph=cuda_graph)
        out = decoder.generate(
            batch["input_ids"], batch["attention_mask"], max_new_tokens, do_sample=not greedy,
            eos_token_id=eos[0] if isinstance(eos, list) else eos, pad_token_id=tokenizer.pad_token_id, **sampling,
        )
    else:
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=tokenizer.pad_token_id, **sampling
        )
    new_tokens = out[:, batch["input_ids"].shape[1] :]  # [B, <= max_new_tokens]
    return [p + tokenizer.decode(t, skip_special_tokens=True) for p, t in zip(prompts, new_tokens)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m zoo.generate", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="an hf/ directory written by zoo.train, or its run directory")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diffusion-steps", type=int, default=None, help="denoising steps (masked-diffusion checkpoints)")
    parser.add_argument("--static", action="store_true", help="decode from preallocated states (zoo.decoding)")
    parser.add_argument("--cuda-graph", action="store_true", help="--static, each decode step replayed as a CUDA graph")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise ZooError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature <= 0:
        raise ZooError(f"--temperature must be > 0, got {args.temperature} (use --greedy for argmax decoding)")
    if not 0 < args.top_p <= 1:
        raise ZooError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ZooError(f"--top-k must be >= 0, got {args.top_k}")
    if args.diffusion_steps is not None and args.diffusion_steps < 1:
        raise ZooError(f"--diffusion-steps must be >= 1, got {args.diffusion_steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body() -> None:
        args = parse_args(argv)
        path = resolve_checkpoint(args.checkpoint)
        import zoo  # noqa: F401  (registers the zoo model type with the Auto classes)
        from zoo.config import check_config_file

        check_config_file(path)
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        if getattr(AutoConfig.from_pretrained(path), "diffusion", None) is not None:
            from zoo.diffusion import sample_text

            if args.greedy:
                raise ZooError("--greedy is not supported for masked-diffusion checkpoints; lower --temperature instead")
            if args.static or args.cuda_graph:
                raise ZooError("--static and --cuda-graph decode causal checkpoints; a masked-diffusion checkpoint samples with --diffusion-steps")
            model = AutoModelForMaskedLM.from_pretrained(path).to(args.device).eval()
            texts = sample_text(
                model, tokenizer, args.prompt, steps=args.diffusion_steps, length=args.max_new_tokens,
                temperature=args.temperature, seed=args.seed,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path).to(args.device).eval()
            texts = generate_causal(
                model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                static=args.static, cuda_graph=args.cuda_graph,
            )
        for text in texts:
            print(text, end="\n\n")

    return run_main("zoo.generate", body)


if __name__ == "__main__":
    sys.exit(main())
