"""The runner's rotary embedding against FMS's own: bit-identical outputs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fms")

from fms.modules.positions import RotaryEmbedding  # noqa: E402

from spyre_cb.rotary import patch_rotary  # noqa: E402


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_to_fms(dtype, native, monkeypatch):
    """Both ways the runner rotates (the native pass, and torch's ops inside a
    compiled graph) give FMS's bits, on contiguous and on strided heads."""
    if not native:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    g = torch.Generator().manual_seed(0)
    for theta, dim in ((10_000.0, 64), (1_000_000.0, 128)):
        ref = RotaryEmbedding(dim=dim, ratio=theta, max_seq_len=256)
        fast = RotaryEmbedding(dim=dim, ratio=theta, max_seq_len=256)
        holder = torch.nn.Module()
        holder.rot = fast
        assert patch_rotary(holder) == 1
        for b, lq, lk, h in ((3, 1, 1, 4), (1, 37, 37, 2), (2, 5, 9, 3)):
            q = torch.randn(b, lq, h, dim, generator=g).to(dtype)
            k = torch.randn(b, lk, h, 2 * dim, generator=g).to(dtype)[..., dim:]  # strided, as a split gives
            pos = torch.randint(0, 180, (b, 1)) + torch.arange(max(lq, lk))
            want = ref.adjusted_qk(q, k, pos)
            got = fast.adjusted_qk(q, k, pos)
            for w, x in zip(want, got):
                assert x.dtype == w.dtype and x.shape == w.shape
                assert torch.equal(x, w)
        # the last position of the cache
        pos = torch.tensor([[255]])
        q = torch.randn(1, 1, 2, dim, generator=g).to(dtype)
        assert torch.equal(fast.adjusted_qk(q, q, pos)[0], ref.adjusted_qk(q, q, pos)[0])


def test_the_kernel_refuses_shared_and_strided_buffers():
    from spyre_cb import _core
    from spyre_cb.views import numpy_view

    x = torch.randn(2, 3, 8).bfloat16()
    angles = torch.rand(2, 4).numpy()
    with pytest.raises(ValueError, match="rope: x and out share memory"):
        _core.rope_bf16(numpy_view(x), angles, angles, angles, numpy_view(x))
    with pytest.raises(ValueError, match="rope: cos must be C-contiguous"):
        wide = torch.rand(2, 8).numpy()[:, ::2]
        _core.rope_bf16(numpy_view(x), wide, angles, angles, numpy_view(torch.empty_like(x)))
