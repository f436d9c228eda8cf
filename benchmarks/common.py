"""What every benchmark shares: the report writer, the machine's description, timing, the OOM guard, memory sampling."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "triton", "transformers", "zoo")


def write_report(stem: Path, report: dict, table: str) -> None:
    """Write ``stem.json`` and ``stem.md`` (creating the folder), print the table and where both went."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_name(stem.name + ".md").write_text(table)
    print(table, end="" if table.endswith("\n") else "\n")
    print(f"wrote {stem.with_name(stem.name + '.json')} and {stem.with_name(stem.name + '.md')}")


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``: a file-name part."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def version_of(distribution: str) -> str | None:
    """The installed version from the package metadata (importing a package such as fla has side effects)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine(device: torch.device | str = "cpu", packages: Iterable[str] = ()) -> dict[str, Any]:
    """The device, the CPU count and memory, the load average, the date and the versions of zoo's main packages
    (plus ``packages``): the ``meta`` of every report."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "device": device_name(device), "cpus": os.cpu_count(), "memory_gib": round(memory_gib, 1),
        "platform": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        **{name: version_of(name) for name in dict.fromkeys([*PACKAGES, *packages])},
        "load_average": load_average(), "date": now(),
    }


def median(values: Iterable[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


class Clock:
    """Marks points in time: CUDA events on GPU (read after one synchronize), ``perf_counter`` on CPU; with
    ``cpu_time`` also the process's CPU time (less sensitive to other processes' load)."""

    def __init__(self, device: torch.device | str = "cpu", cpu_time: bool = False):
        self.cuda = torch.device(device).type == "cuda"
        self.cpu_time = cpu_time
        self.marks: list[Any] = []
        self.cpu_marks: list[float] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        if self.cpu_time:
            self.cpu_marks.append(time.process_time())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]

    def cpu_intervals_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.cpu_marks, self.cpu_marks[1:])]


def time_ms(fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 1, iters: int = 5) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    clock = Clock(device)
    clock.mark()
    for _ in range(iters):
        fn()
        clock.mark()
    return median(clock.intervals_ms())


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def guarded(fn: Callable[[], Any], device: torch.device | str = "cpu") -> Any:
    """``fn()``, ``"oom"`` when it runs out of memory, ``{"error": ...}`` on another failure (one size failing must
    not stop a benchmark)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        return "oom" if is_oom(err) else {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
    finally:
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def cuda_peak_mb(device: torch.device | str) -> float | None:
    device = torch.device(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def peak_rss_mb() -> float:
    """This process's peak resident set (``ru_maxrss``: memory-mapped pages it touched count too)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_memory_mb(pid: int | str = "self") -> dict[str, float]:
    """``{"anon": RssAnon, "rss": VmRSS}`` of a process in MiB; empty when it is gone."""
    keys = {"RssAnon": "anon", "VmRSS": "rss"}
    try:
        with open(f"/proc/{pid}/status") as f:
            return {keys[k]: int(v.split()[0]) / 1024 for k, _, v in (line.partition(":") for line in f) if k in keys}
    except OSError:
        return {}


class MemorySampler:
    """Peak ``RssAnon`` / ``VmRSS`` (MiB) of a process and, with ``tree``, all its descendants, sampled every
    ``interval`` seconds in a thread. ``label(pid)`` names a process (once it is not ``"worker"`` it sticks);
    ``stop()`` samples once more and returns ``{pid: {"label", "anon", "rss"}}``."""

    def __init__(self, root: int | None = None, interval: float = 0.05, tree: bool = False,
                 label: Callable[[int], str] = lambda pid: "worker"):
        self.root, self.interval, self.tree, self.label = root or os.getpid(), interval, tree, label
        self.peaks: dict[int, dict] = {}
        self._stop = threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _pids(self) -> list[int]:
        pids, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            if self.tree:
                try:
                    todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
                except OSError:
                    pass
        return pids

    def _sample(self) -> None:
        for pid in self._pids():
            memory = process_memory_mb(pid)
            if not memory:
                continue
            entry = self.peaks.setdefault(pid, {"label": "worker", "anon": 0.0, "rss": 0.0})
            if entry["label"] == "worker":  # a child seen between fork and exec still looks like its parent
                entry["label"] = self.label(pid)
            for key, value in memory.items():
                entry[key] = max(entry[key], value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> dict[int, dict]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.peaks


def peer_models(d_model: int, n_layers: int, vocab_size: int, ssm_layers: int | None = None
                ) -> tuple[dict[str, Callable[[], torch.nn.Module]], dict[str, str]]:
    """Constructors of the peers zoo is measured against, ``"<source> <model_type>"`` (zoo.convert converts every
    type): Hugging Face Llama (SDPA; zoo's SwiGLU width), Mixtral, Qwen3-Next (three Gated DeltaNet layers to one gated
    attention, partial RoPE, 8 experts top-2 with a gated shared expert), Mamba, Mamba-2 (``ssm_layers``, default twice
    the layers, no FFN) and, when fla imports, fla RetNet / RWKV-6 / RWKV-7; and the reason each missing peer is skipped."""
    import transformers as hf

    from zoo.layers import SwiGLUConfig

    d, n, v, heads = d_model, n_layers, vocab_size, max(1, d_model // 64)
    attention = dict(vocab_size=v, hidden_size=d, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=heads)
    ssm = dict(vocab_size=v, hidden_size=d, num_hidden_layers=ssm_layers or 2 * n, expand=2, conv_kernel=4)
    ssd_heads = max(1, 2 * d // 64)
    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "hf llama": lambda: hf.LlamaForCausalLM(hf.LlamaConfig(
            **attention, intermediate_size=SwiGLUConfig().resolved_hidden_size(d), attn_implementation="sdpa")),
        "hf mixtral": lambda: hf.MixtralForCausalLM(hf.MixtralConfig(
            **attention, intermediate_size=2 * d, num_local_experts=8, num_experts_per_tok=2)),
        "hf qwen3_next": lambda: hf.Qwen3NextForCausalLM(hf.Qwen3NextConfig(
            vocab_size=v, hidden_size=d, num_hidden_layers=n, intermediate_size=SwiGLUConfig().resolved_hidden_size(d),
            layer_types=[("full_attention" if i % 4 == 3 else "linear_attention") for i in range(n)],
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=64,
            linear_num_key_heads=heads, linear_num_value_heads=2 * heads, linear_key_head_dim=64, linear_value_head_dim=64,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=d, shared_expert_intermediate_size=d)),
        "hf mamba": lambda: hf.MambaForCausalLM(hf.MambaConfig(**ssm, state_size=16)),
        "hf mamba2": lambda: hf.Mamba2ForCausalLM(hf.Mamba2Config(
            **ssm, state_size=64, num_heads=ssd_heads, head_dim=2 * d // ssd_heads, n_groups=1, chunk_size=64)),
    }
    fla_names = ("fla retnet", "fla rwkv6", "fla rwkv7")
    try:
        from fla.models import RetNetConfig, RetNetForCausalLM, RWKV6Config, RWKV6ForCausalLM, RWKV7Config, RWKV7ForCausalLM
    except Exception as err:  # noqa: BLE001 - fla missing or of another version: its peers are skipped
        return builders, {name: f"fla does not import: {type(err).__name__}: {err}".splitlines()[0] for name in fla_names}
    common = {"vocab_size": v, "hidden_size": d, "num_hidden_layers": n}
    builders["fla retnet"] = lambda: RetNetForCausalLM(RetNetConfig(num_heads=heads, **common))
    builders["fla rwkv6"] = lambda: RWKV6ForCausalLM(RWKV6Config(**common))
    builders["fla rwkv7"] = lambda: RWKV7ForCausalLM(RWKV7Config(**common))
    return builders, {}


def write_corpus(directory: Path, n_bytes: int, doc_bytes: int = 256 * 1024, seed: int = 0) -> tuple[int, list[str]]:
    """Text files of ``doc_bytes`` (the last one shorter) of lines of random words from a fixed vocabulary of 5,000
    random lowercase words (2-9 letters); returns the bytes written and the sorted distinct words."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 10))) for _ in range(5000)])
    directory.mkdir(parents=True, exist_ok=True)
    written, i = 0, 0
    while written < n_bytes:
        size = min(doc_bytes, n_bytes - written)
        idx = rng.integers(0, len(words), size // 4 + 16)
        text = " ".join(words[idx]).replace(words[0], words[0] + "\n")[:size]
        (directory / f"doc{i:06d}.txt").write_text(text)
        written += len(text.encode())
        i += 1
    return written, sorted(set(words.tolist()))
