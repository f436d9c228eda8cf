"""RWKV-7's name for the generalized delta rule op, :mod:`zoo.kernels.dplr_delta_rule` (its WKV operator is that op).

The op was ``zoo.kernels.rwkv7`` before issue 27; its public names stay importable from here as the same objects:
``rwkv7`` is :func:`~zoo.kernels.dplr_delta_rule.dplr_delta_rule`, ``rwkv7_<form>`` is ``dplr_delta_rule_<form>``,
and the Triton functions load on first use, as there. Submodules (``naive``, ``triton_chunk_parallel``, ...) are
only under the new name.
"""
from zoo.kernels.dplr_delta_rule import BACKENDS, GATED_DELTA_BACKENDS, KDA_BACKENDS, gated_delta_rule, kda_rule
from zoo.kernels.dplr_delta_rule import dplr_delta_rule as rwkv7
from zoo.kernels.dplr_delta_rule import dplr_delta_rule_chunked as rwkv7_chunked
from zoo.kernels.dplr_delta_rule import dplr_delta_rule_keys as rwkv7_keys
from zoo.kernels.dplr_delta_rule import dplr_delta_rule_naive as rwkv7_naive
from zoo.kernels.dplr_delta_rule import dplr_delta_rule_recurrent as rwkv7_recurrent
from zoo.kernels.dplr_delta_rule import dplr_delta_rule_step as rwkv7_step

__all__ = ["BACKENDS", "GATED_DELTA_BACKENDS", "KDA_BACKENDS", "gated_delta_rule", "kda_rule", "rwkv7", "rwkv7_chunked",
           "rwkv7_naive", "rwkv7_step", "rwkv7_triton", "rwkv7_triton_chunk"]
__getattr__ = BACKENDS.exports(__name__, rwkv7_triton="triton_recurrent", rwkv7_triton_chunk="triton_chunk")
