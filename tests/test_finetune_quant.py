"""Quantized bases: `--bits 8` is accepted and wired (CPU: a clear refusal, bitsandbytes is GPU-only), 8-bit and
4-bit routed experts run the grouped path on their dequantized weights, with LoRA on the experts."""

from __future__ import annotations

import pytest
import torch

from minke.cli import main
from minke.config import config_from_dict
from minke.models.moe import Experts, experts_reference
from minke.train.finetune import LoraOptions
from minke.train.moe_train import ExpertLoRA, experts_lora_reference
from minke.train.quant import QuantizedExperts, dequantize_rows_int8, quantize_rows_int8
from tiny_models import make_checkpoint

torch.set_num_threads(1)


def _experts(seed=0):
    cfg = config_from_dict(dict(model_type="deepseek", vocab_size=16, hidden_size=64, num_hidden_layers=1,
                                num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=32))
    torch.manual_seed(seed)
    ex = Experts(cfg)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.05)
        ex.down_proj.normal_(0, 0.05)
    return ex


def test_bits_8_is_accepted_with_lora_and_refused_without():
    assert LoraOptions(use_lora=True, bits=8).bits == 8
    with pytest.raises(ValueError, match="--use_lora True"):
        LoraOptions(use_lora=False, bits=8)
    with pytest.raises(ValueError, match="4, 8, 16 or 32"):
        LoraOptions(use_lora=True, bits=2)


def test_bits_8_on_cpu_is_a_clear_error(tmp_path, capsys):
    import os
    import shutil

    from minke.train.bpe import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["User: hi\n\nAssistant: hello there"] * 4, 300, str(tmp_path / "tok"))
    base = str(tmp_path / "base")
    make_checkpoint("llama", base, vocab_size=300, bos_token_id=0, eos_token_id=1)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok, f), os.path.join(base, f))
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello there"}\n')
    rc = main(["finetune", "--model_name_or_path", base, "--data_path", str(data), "--output_dir",
               str(tmp_path / "o"), "--use_lora", "True", "--bits", "8", "--bf16", "True", "--use_cpu", "True",
               "--max_steps", "1"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "--bits 8" in err and "CUDA GPU" in err


def test_int8_rows_round_trip():
    w = torch.randn(3, 5, 16)
    q, amax = quantize_rows_int8(w)
    assert q.dtype == torch.int8 and amax.shape == (3, 5)
    err = (dequantize_rows_int8(q, amax, torch.float32) - w).abs()
    assert (err <= amax.unsqueeze(-1) / 127 / 2 + 1e-6).all(), "within half a quantization step"


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts_with_lora_equal_the_loop_on_dequantized_weights(bits):
    if bits == 4:
        pytest.importorskip("bitsandbytes")
    ex = _experts()
    q = QuantizedExperts(ex, torch.device("cpu"), torch.float32, "nf4", True, bits=bits)
    gu, dn = q.dequantized()
    assert (gu - ex.gate_up_proj).abs().max() < (0.01 if bits == 8 else 0.05)
    q.lora = ExpertLoRA(4, 64, 32, {"gate_up_proj": 4, "down_proj": 4}, {"gate_up_proj": 8.0, "down_proj": 8.0})
    with torch.no_grad():
        q.lora.gate_up_proj_B.normal_(0, 0.1)
        q.lora.down_proj_B.normal_(0, 0.1)
    x = torch.randn(10, 64, requires_grad=True)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(10)])
    w = torch.rand(10, 2)
    out = q(x, ids, w)
    ref = experts_lora_reference(x.detach(), gu, dn, ids, w, lora=q.lora)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, experts_reference(x.detach(), gu, dn, ids, w))
    out.pow(2).sum().backward()
    assert x.grad is not None and q.lora.gate_up_proj_A.grad.abs().max() > 0
