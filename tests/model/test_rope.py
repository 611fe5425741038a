import math

import pytest
import torch

from bam_model.rope import apply_rope, rope_cos_sin


def _rope_by_pairs(x_BTHD, positions_BT, theta):
    """Independent definition: rotate the pair (x[i], x[i + Dh/2]) by angle pos * theta^(-2i/Dh)."""
    out = torch.empty_like(x_BTHD)
    half = x_BTHD.shape[-1] // 2
    for i in range(half):
        angle = positions_BT.to(torch.float64)[..., None] * theta ** (-2 * i / x_BTHD.shape[-1])
        a, b = x_BTHD[..., i], x_BTHD[..., i + half]
        out[..., i] = a * angle.cos() - b * angle.sin()
        out[..., i + half] = b * angle.cos() + a * angle.sin()
    return out


@pytest.mark.parametrize("head_dim", [2, 16, 64])
def test_rope_matches_pairwise_rotation(head_dim):
    B, T, H = 2, 7, 3
    x = torch.randn(B, T, H, head_dim, dtype=torch.float64)
    positions = torch.randint(0, 5000, (B, T))
    cos, sin = rope_cos_sin(positions, head_dim, theta=500000.0, dtype=torch.float64)
    assert cos.shape == (B, T, head_dim)
    torch.testing.assert_close(apply_rope(x, cos, sin), _rope_by_pairs(x, positions, 500000.0))


def test_rope_relative_positions_and_norm():
    T, H, Dh = 9, 2, 16
    q = torch.randn(1, H, Dh, dtype=torch.float64).expand(T, H, Dh)
    k = torch.randn(1, H, Dh, dtype=torch.float64).expand(T, H, Dh)
    cos, sin = rope_cos_sin(torch.arange(T), Dh, dtype=torch.float64)
    q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))
    # The score depends only on the offset between positions.
    scores = torch.einsum("thd,shd->hts", q_rot, k_rot)
    torch.testing.assert_close(scores[:, 5, 2], scores[:, 6, 3])
    torch.testing.assert_close(scores[:, 0, 0], scores[:, 8, 8])


def test_rope_shared_positions_broadcast_and_dtype():
    x = torch.randn(3, 5, 4, 8, dtype=torch.float16)
    cos, sin = rope_cos_sin(torch.arange(5), 8, dtype=torch.float16)
    y = apply_rope(x, cos, sin)
    assert y.dtype == torch.float16 and y.shape == x.shape
    y_ref = apply_rope(x.double(), *rope_cos_sin(torch.arange(5), 8, dtype=torch.float64))
    assert (y.double() - y_ref).abs().max() < 1e-2 * math.sqrt(8)


def test_rope_bad_input():
    with pytest.raises(ValueError, match="positions"):
        rope_cos_sin(torch.arange(4.0), 8)
    with pytest.raises(ValueError, match="head_dim"):
        rope_cos_sin(torch.arange(4), 7)
    cos, sin = rope_cos_sin(torch.arange(4), 8)
    with pytest.raises(ValueError, match="cos and sin"):
        apply_rope(torch.randn(5, 2, 8), cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_range_table_equals_the_angles_computed_afresh(dtype):
    """Slices of the shared table (grown by doubling past its first 256 positions) match
    rope_cos_sin of the same positions."""
    from bam_model.rope import _TABLES, rope_cos_sin_range
    _TABLES.clear()
    for start, length in [(0, 7), (250, 1), (255, 300), (1000, 33), (3, 1)]:
        cos, sin = rope_cos_sin_range(start, length, 32, 5000.0, dtype=dtype)
        ref_cos, ref_sin = rope_cos_sin(torch.arange(start, start + length), 32, 5000.0, dtype=dtype)
        assert cos.shape == (length, 32) and cos.dtype == dtype
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6 if dtype != torch.float16 else 1e-3)
        torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6 if dtype != torch.float16 else 1e-3)
    assert len(_TABLES) == 1  # one table, grown in place of the old, whatever dtype is asked for


def test_range_table_made_in_inference_mode_serves_training():
    """The first call under torch.inference_mode (generation) must not leave an inference tensor
    that a later training step would need to save for backward."""
    from bam_model.rope import _TABLES, rope_cos_sin_range
    _TABLES.clear()
    with torch.inference_mode():
        rope_cos_sin_range(0, 4, 16)
    cos, sin = rope_cos_sin_range(0, 4, 16)
    q = torch.randn(4, 16, requires_grad=True)
    (q * cos + q * sin).sum().backward()
    assert q.grad is not None
