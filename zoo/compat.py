"""Every difference between the supported transformers versions (floor 5.8.1, newest 5.25), in one module.

Each name here says which versions it bridges; raising the floor past a version deletes its branch here and nothing
elsewhere.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers' per-layer config support (>= 5.24); earlier versions get an AttributeError of the same meaning
    from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError
except ImportError:
    class AmbiguousGlobalPerLayerAttributeError(AttributeError):
        """A config attribute that differs across layers, read as one value."""

# transformers >= 5.24 names the decoding cache ``cache`` (forward argument and output field); earlier versions name
# it ``past_key_values``. zoo's forwards accept both and return the cache under the installed version's name.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# transformers >= 5.25 rolls recurrent states back for assisted and prompt-lookup decoding: the cache records the
# states of the last tokens (``activate_past_recording``) and ``crop(-n)`` restores one. Earlier versions refuse
# assisted decoding for models whose state cannot roll back (``_is_stateful``).
RECURRENT_ROLLBACK = hasattr(Cache, "get_recurrent_states_to_keep")

# ``cache_implementation`` names of a growing cache: transformers < 5.24 asks assistants for "dynamic_full".
DYNAMIC_CACHE_NAMES = ("dynamic", "dynamic_full")


def resolve_cache(cache: Any, past_key_values: Any) -> Any:
    """The cache a forward was given, under either name (``past_key_values`` is the older name of ``cache``)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the decoding cache once: `cache` and `past_key_values` (its older name) were both given")
    return cache if cache is not None else past_key_values


def output_cache(output: Any) -> Any:
    """The cache a zoo model's output holds, whatever the installed transformers calls the field."""
    return output.get(CACHE_FIELD)


def crop_keep(length: int, seen: int) -> int:
    """How many of ``seen`` tokens ``Cache.crop(length)`` keeps: it drops the last ``-length`` for ``length <= 0``
    (transformers >= 5.24) and keeps the first ``length`` otherwise (earlier versions)."""
    return seen + length if length <= 0 else min(length, seen)


def query_length(query: int | torch.Tensor) -> int:
    """The query length ``get_mask_sizes`` is asked about: a count (>= 5.24) or the query's positions (earlier)."""
    return query if isinstance(query, int) else query.shape[0]
