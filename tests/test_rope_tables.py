"""The shared RoPE tables of decode (layers/attention.py): the same values as computing them at the positions, the
rotation the same as HF Llama's rotate-half, usable for training after an inference-mode generate."""
import torch

from zoo.layers.attention import _ROPE_TABLES, apply_rope, rope_cos_sin, rope_table, signed_rope_tables


def rotate_half_reference(x, cos, sin):
    """HF Llama's ``apply_rotary_pos_emb`` on plain tables."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def test_table_rows_are_the_tables_of_their_positions_bit_for_bit():
    """Rows 300..309 after the table grew past its first 256 entries, and rows gathered per batch row."""
    _ROPE_TABLES.clear()
    cos, sin = rope_table(10, 24, 5000.0, torch.device("cpu"), torch.float32)
    assert cos.shape == (256, 24)
    cos, sin = rope_table(310, 24, 5000.0, torch.device("cpu"), torch.float32)
    assert cos.shape == (512, 24) and len(_ROPE_TABLES) == 1
    positions = torch.arange(300, 310)
    expected = signed_rope_tables(positions, 24, 5000.0, torch.float32)
    assert torch.equal(cos[300:310], expected[0]) and torch.equal(sin[300:310], expected[1])
    rows = torch.tensor([[3, 4], [200, 201]])  # [B, T]
    assert torch.equal(cos[rows], signed_rope_tables(rows, 24, 5000.0, torch.float32)[0])
    half = rope_table(4, 24, 5000.0, torch.device("cpu"), torch.bfloat16)[0]
    assert half.dtype == torch.bfloat16 and torch.equal(half, cos[:256].to(torch.bfloat16))


def test_apply_rope_is_rotate_half_exactly():
    x = torch.randn(2, 3, 5, 16)
    positions = torch.arange(7, 12)
    cos, sin = rope_cos_sin(positions, 16, 10000.0)
    signed_cos, signed_sin = signed_rope_tables(positions, 16, 10000.0, torch.float32)
    assert torch.equal(apply_rope(x, signed_cos, signed_sin), rotate_half_reference(x, cos, sin))


def test_a_table_made_in_inference_mode_trains():
    """``generate`` runs under inference mode; a table it grew must still be saved for a later backward."""
    _ROPE_TABLES.clear()
    with torch.inference_mode():
        rope_table(8, 8, 10000.0, torch.device("cpu"), torch.float32)
    cos, sin = rope_table(8, 8, 10000.0, torch.device("cpu"), torch.float32)
    assert not cos.is_inference()
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    apply_rope(x, cos[:8], sin[:8]).sum().backward()
    assert x.grad is not None
