"""Packed causal prefill attention in Triton (kernels/prefill_attention.py) against its fp32 reference: chunks after
a cached prefix (more keys than queries), GQA, head sizes that are not powers of two, q/k and v of different sizes
(MLA's 192 / 128), empty and one-token chunks; and the engine's backend choosing it where flash cannot run.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py); on a CUDA machine the compiled kernel."""

import pytest
import torch

import minke.kernels.prefill_attention as _kmod
from minke.kernels.prefill_attention import varlen_attention, varlen_attention_ref
from conftest import kernel_test_setup

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._varlen_attention_kernel)


def _packed(q_lens, k_lens, h, hkv, dk, dv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), h, dk, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(sum(k_lens), hkv, dk, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(sum(k_lens), hkv, dv, generator=g).to(dtype).to(DEVICE)
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    return q, k, v, cu(q_lens), cu(k_lens)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,hkv,dk,dv", [(4, 2, 24, 24), (2, 2, 48, 32)], ids=["gqa", "mla-like"])
def test_varlen_attention_matches_reference(dtype, h, hkv, dk, dv):
    q_lens, k_lens = [5, 1, 37, 0, 3], [5, 9, 70, 4, 3]  # fresh, decode-like, chunk after a prefix, empty chunk
    q, k, v, cu_q, cu_k = _packed(q_lens, k_lens, h, hkv, dk, dv, dtype, 3)
    out = varlen_attention(q, k, v, cu_q, cu_k, max(q_lens), scale=dk ** -0.5)
    ref = varlen_attention_ref(q, k, v, q_lens, k_lens, scale=dk ** -0.5)
    assert out.shape == (sum(q_lens), h, dv) and out.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    # a larger max_q (a bound, as a CUDA graph's bucket) changes nothing: blocks past a sequence's end exit
    torch.testing.assert_close(varlen_attention(q, k, v, cu_q, cu_k, 64, scale=dk ** -0.5), out, rtol=0, atol=0)


def test_reference_is_bottom_right_causal():
    """Query i of a q_len chunk of a k_len context sees keys 0 .. i + k_len - q_len: with one value per key equal to
    its position and equal logits, the output is the mean of the positions it may see."""
    q_lens, k_lens = [3], [7]
    q = torch.zeros(3, 1, 4)
    k = torch.zeros(7, 1, 4)
    v = torch.arange(7.0).view(7, 1, 1)
    out = varlen_attention_ref(q, k, v, q_lens, k_lens, scale=1.0)
    assert out.flatten().tolist() == [2.0, 2.5, 3.0]  # keys 0..4, 0..5, 0..6


@needs_triton
def test_varlen_attention_rejects_bad_input():
    q, k, v, cu_q, cu_k = _packed([2], [2], 3, 2, 16, 16, torch.float32, 1)
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention(q, k, v, cu_q, cu_k, 2, 1.0)
    with pytest.raises(ValueError, match="need q"):
        varlen_attention(q[..., :8], k, v, cu_q, cu_k, 2, 1.0)


@needs_triton
def test_triton_backend_prefill_equals_torch_backend(monkeypatch):
    """The engine's Triton backend sends half-precision chunks flash cannot take (here: the CPU) to the varlen
    kernel in one launch; the torch backend loops over the chunks with SDPA. Same result, MLA head sizes (q/k 48,
    v 32). fp32 stays on the loop."""
    import minke.kernels.prefill_attention as kernel
    from minke.models.attention import TritonAttentionBackend
    from minke.models.attention import PrefillPack, TorchAttentionBackend

    q_lens, k_lens = [6, 2, 11], [6, 10, 30]
    calls = []
    monkeypatch.setattr(kernel, "varlen_attention", lambda *a: calls.append(a[0].dtype) or varlen_attention(*a))
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 2e-5)):
        q, k, v, cu_q, cu_k = _packed(q_lens, k_lens, 4, 4, 48, 32, dtype, 7)
        pack = PrefillPack(start=0, cu_q=cu_q, cu_k=cu_k, q_lens=q_lens, k_lens=k_lens, slots=None)
        want = TorchAttentionBackend.prefill(q, k, v, pack, 0.2)
        got = TritonAttentionBackend.prefill(q, k, v, pack, 0.2)
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert calls == ([torch.bfloat16] if DEVICE == "cpu" else [])  # on a GPU flash takes these bf16 shapes
