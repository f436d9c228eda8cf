"""The model's norms, computed in fp32 like Llama's RMSNorm: ``NORMS`` names them for ``model.norm``."""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class ZeroCentredRMSNorm(RMSNorm):
    """RMSNorm scaled by ``1 + weight`` (weight zero at init), in fp32 before the cast back: Qwen3-Next's RMSNorm
    (weight decay pulls the scale towards 1 instead of 0)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def init_parameters(self) -> None:
        init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with weight and bias (RWKV's ``ln0``/``ln1``/``ln2``/``ln_out``), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


# model.norm: the norm before each branch of a residual layer, after the embedding (model.embed_norm) and at the end
NORMS: dict[str, type[nn.Module]] = {"rmsnorm": RMSNorm, "rmsnorm_zero_centred": ZeroCentredRMSNorm, "layernorm": LayerNorm}
