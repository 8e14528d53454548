"""Full fine-tuning writes its output in the base checkpoint's dtype: a bf16 base gives a bf16 model of the base's
size (not fp32 of twice the size), whatever --bf16 says; checkpoints keep fp32 master weights."""

from __future__ import annotations

import json
import os
import shutil

import torch

from minke.cli import main
from minke.train.bpe import train_bpe_tokenizer
from tiny_models import make_checkpoint

torch.set_num_threads(1)


def _weights_size(d: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


def test_full_finetune_output_keeps_the_base_dtype(tmp_path):
    from safetensors import safe_open

    tok = train_bpe_tokenizer(["User: hi\n\nAssistant: hello there"] * 4, 300, str(tmp_path / "tok"))
    base = str(tmp_path / "base")
    make_checkpoint("deepseek_v2_lite", base, vocab_size=300, bos_token_id=0, eos_token_id=1, dtype=torch.bfloat16)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok, f), os.path.join(base, f))
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello there"}\n' * 4)
    out = str(tmp_path / "out")
    assert main(["finetune", "--model_name_or_path", base, "--data_path", str(data), "--output_dir", out,
                 "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "2",
                 "--disable_tqdm", "True", "--learning_rate", "1e-3"]) == 0
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert _weights_size(out) <= 1.01 * _weights_size(base)
    ck = os.path.join(out, "checkpoint-1")
    with safe_open(os.path.join(ck, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}, "checkpoints keep the fp32 masters"
