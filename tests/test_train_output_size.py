"""The disk-space estimate `minke finetune` prints and checks before training: the final model is written in the
base checkpoint's dtype, so a bf16 base fine-tuned in fp32 is estimated (and saved) at 2 bytes a parameter."""

import torch
from torch import nn

from minke.train.args import TrainingConfig
from minke.train.session import output_sizes
from minke.train.writers import AdapterWriter, FullModelWriter


def _model():
    m = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 5, bias=False))  # 150 parameters
    m[1].weight.requires_grad_(False)
    return m


def test_full_model_final_size_follows_the_writers_dtype():
    m = _model()
    cfg = TrainingConfig(output_dir="/tmp/x", bf16=False)
    bf16 = FullModelWriter(m, {}, torch.bfloat16, None)
    fp32 = FullModelWriter(m, {}, torch.float32, None)
    ckpt, final = output_sizes(m, bf16, cfg)
    assert final == 150 * 2
    assert ckpt == 150 * 4 + 100 * 8  # fp32 master weights + two fp32 AdamW moments per trainable weight
    assert output_sizes(m, fp32, cfg)[1] == 150 * 4


def test_adapter_final_size_counts_only_the_trainable_part():
    m = _model()
    cfg = TrainingConfig(output_dir="/tmp/x")
    w = AdapterWriter.__new__(AdapterWriter)  # the size estimate reads only the class's trainable_only
    assert output_sizes(m, w, cfg) == (100 * 12, 100 * 4)
