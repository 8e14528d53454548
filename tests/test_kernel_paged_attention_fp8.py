"""The fp8 cache's widening (kernels/paged_attention_fp8.py fp8_words_to_f16): every 16-bit word of two fp8 values
becomes the even and the odd fp16 value torch gives for those bytes, for both formats. On a CUDA machine this runs
the inline PTX the decode kernels use; on a CPU the interpreter's casts (tests/conftest.py sets TRITON_INTERPRET)."""

import pytest
import torch

import minke.kernels.paged_attention_fp8 as _kmod
from minke.kernels.paged_attention_fp8 import fp8_words_to_f16_ref, fp8_words_to_f16_triton
from conftest import kernel_test_setup

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._widen_kernel)


@needs_triton
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_word_widens_to_torchs_values(fp8_dtype):
    words = torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16).to(DEVICE)  # every pair of bytes
    even, odd = fp8_words_to_f16_triton(words, fp8_dtype)
    want_even, want_odd = fp8_words_to_f16_ref(words, fp8_dtype)
    for got, want in ((even, want_even), (odd, want_odd)):
        nan = want.isnan()
        if not INTERPRET:  # the NaN codes (never written: the quantizer saturates) stay NaN in compiled code; the
            assert torch.equal(got.isnan(), nan)  # interpreter's cast reads e4m3's as +-480
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))  # bit for bit, -0 included
    # byte 0 of a word is its even column: 0x3800 holds 0x00 (even) and 0x38 (odd)
    e, o = fp8_words_to_f16_triton(torch.tensor([0x3800], dtype=torch.int32).to(torch.uint16).to(DEVICE), fp8_dtype)
    assert e.item() == 0.0 and o.item() == torch.tensor([0x38], dtype=torch.uint8).view(fp8_dtype).float().item()
