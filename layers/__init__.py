"""zoo.layers: sequence mixers behind one contract, feed-forward modules and the registries that name them.

Every module of this package is imported here, so a block or FFN file registers itself (``@MIXERS.register``) by
being in this folder: adding a block edits no list.
"""
import importlib
import pkgutil

from .base import Bidirectional, SequenceMixer, map_state
from .registry import FFNS, MIXERS, Entry, Registry
from .norm import NORMS, LayerNorm, RMSNorm
from .layer import ResidualLayer
from .attention import Attention, AttentionConfig, AttentionState
from .lstm import LSTM, LSTMConfig, LSTMState
from .ffn import SwiGLU, SwiGLUConfig
from .retnet import RetNet, RetNetConfig, RetNetState
from .mamba import Mamba, MambaConfig, MambaState
from .mamba2 import Mamba2, Mamba2Config, Mamba2State
from .moe import MoE, MoEConfig, RouterStats
from .rwkv6 import RWKV6, RWKV6Config, RWKV6State
from .rwkv7 import RWKV7, RWKV7Config, RWKV7State
from .gated_deltanet import DeltaRuleState, GatedDeltaNet, GatedDeltaNetConfig
from .kda import KDA, KDAConfig
from .rwkv_cmix import RWKV7ChannelMix, RWKV7ChannelMixConfig, RWKVChannelMix, RWKVChannelMixConfig

__all__ = [
    "Bidirectional", "FFNS", "MIXERS", "Entry", "Registry", "SequenceMixer", "map_state", "NORMS", "LayerNorm", "RMSNorm", "ResidualLayer",
    "Attention", "AttentionConfig", "AttentionState", "LSTM", "LSTMConfig", "LSTMState", "SwiGLU", "SwiGLUConfig",
    "RetNet", "RetNetConfig", "RetNetState",
    "Mamba", "MambaConfig", "MambaState", "Mamba2", "Mamba2Config", "Mamba2State",
    "MoE", "MoEConfig", "RouterStats",
    "RWKV6", "RWKV6Config", "RWKV6State", "RWKV7", "RWKV7Config", "RWKV7State",
    "DeltaRuleState", "GatedDeltaNet", "GatedDeltaNetConfig", "KDA", "KDAConfig",
    "RWKVChannelMix", "RWKVChannelMixConfig", "RWKV7ChannelMix", "RWKV7ChannelMixConfig",
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
