"""zoo.layers: sequence mixers behind one contract, feed-forward modules and the registries that name them."""
from .base import SequenceMixer, map_state
from .registry import FFNS, MIXERS, Entry, Registry
from .norm import RMSNorm
from .layer import ResidualLayer
from .attention import Attention, AttentionConfig, AttentionState
from .lstm import LSTM, LSTMConfig, LSTMState
from .ffn import SwiGLU, SwiGLUConfig

__all__ = [
    "FFNS", "MIXERS", "Entry", "Registry", "SequenceMixer", "map_state", "RMSNorm", "ResidualLayer",
    "Attention", "AttentionConfig", "AttentionState", "LSTM", "LSTMConfig", "LSTMState", "SwiGLU", "SwiGLUConfig",
]
