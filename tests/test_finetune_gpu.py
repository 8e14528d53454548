"""`minke finetune` on CUDA (skipped without a GPU): DeepSeek's own ZeRO-3 config in one process and in two
(FSDP2), bf16, its WarmupLR schedule, and a SIGKILLed GPU run resuming on the same curve (GPU kernels are not
bitwise deterministic, so curves are compared with a tolerance here; tests/test_finetune_faults.py holds the
bit-exact CPU version)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from minke.cli import main
from tiny_models import make_sft_assets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO3 = {
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR",
                  "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "offload_param": {"device": "cpu", "pin_memory": True}},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_ft")
    qa = [(f"Question number {i}?", f"Answer number {i} is {i * 7}.") for i in range(32)]
    base, data = make_sft_assets(d, qa, vocab_size=320, tokenizer_repeats=2)
    ds = d / "ds_config_zero3.json"
    ds.write_text(json.dumps(ZERO3))
    return base, data, str(ds)


def _args(assets, out, *extra):
    base, data, ds = assets
    return ["finetune", "--model_name_or_path", base, "--data_path", data, "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--logging_steps", "1",
            "--disable_tqdm", "True", "--seed", "0", "--learning_rate", "2e-3", "--warmup_steps", "3",
            "--lr_scheduler_type", "cosine", "--bf16", "True", "--deepspeed", ds, "--max_steps", "16",
            "--save_steps", "4", *extra]


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "trainer_log.jsonl"))]


def _env():
    return {**os.environ, "PYTHONPATH": ROOT}


def test_deepseek_zero3_recipe_one_gpu_and_sigkill_resume(assets, tmp_path, capsys):
    ref = tmp_path / "ref"
    assert main(_args(assets, ref)) == 0
    err = capsys.readouterr().err
    assert "WarmupLR replaces --lr_scheduler_type cosine" in err
    assert "CPU offload honoured through PyTorch FSDP2 on a one-process group" in err
    log = _log(ref)
    assert [r["learning_rate"] for r in log[:2]] == [0.0, 0.0] and log[-1]["learning_rate"] == pytest.approx(2e-3)
    assert log[-1]["ce_loss"] < log[0]["ce_loss"]

    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "minke.cli", *_args(assets, out)], cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not os.path.isfile(out / "checkpoint-8" / "trainer_state.json") and p.poll() is None \
            and time.time() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert main(_args(assets, out)) == 0
    assert "resumed from" in capsys.readouterr().err
    resumed = _log(out)
    assert [r["step"] for r in resumed] == list(range(1, 17))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in log], rel=2e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_deepseek_zero3_recipe_two_gpus_fsdp2_matches_one(assets, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(assets, one, "--per_device_train_batch_size", "8")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minke.cli",
           *_args(assets, two)]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FSDP2 over 2 processes" in r.stderr and "CPU offload" in r.stderr
    assert [x["loss"] for x in _log(two)] == pytest.approx([x["loss"] for x in _log(one)], rel=2e-2)
    assert os.path.exists(two / "completed") and os.path.isfile(two / "model.safetensors")


def _tiny_v2_lora_run(cuda_graphs: bool, dropout: float, steps: int = 6, log=None, device: str = "cuda"):
    """LoRA (attention + routed experts) on a tiny DeepSeek-V2 (MLA + MoE) with fixed-shape blocks, bf16 base,
    gradient checkpointing, grad accumulation 2: the losses of `steps` optimizer steps and the log lines."""
    from minke.config import config_from_dict
    from minke.loader import build_model
    from minke.train.args import TrainingConfig
    from minke.train.data import BlockData
    from minke.train.distributed import DistInfo, ShardPlan
    from minke.train.lora import apply_lora, make_lora_config
    from minke.train.pretrain import init_weights
    from minke.train.trainer import Trainer

    raw = dict(model_type="deepseek_v2", vocab_size=512, hidden_size=64, intermediate_size=128,
               moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
               n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
               kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
               max_position_embeddings=256, aux_loss_alpha=0.001, seq_aux=True, topk_method="greedy",
               norm_topk_prob=False, scoring_func="softmax", routed_scaling_factor=1.0, n_group=1, topk_group=1,
               moe_layer_freq=1, rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=0, eos_token_id=1,
               tie_word_embeddings=False)
    dev = torch.device(device, 0) if device == "cuda" else torch.device(device)
    torch.manual_seed(0)
    with torch.no_grad():
        model = init_weights(build_model(config_from_dict(raw, source="tiny"), torch.bfloat16, dev))
    for p in model.parameters():
        p.requires_grad_(False)
    apply_lora(model, make_lora_config(model, 8, 16, dropout, "all-linear", modules_to_save=""))
    model.gradient_checkpointing = True
    data = torch.randint(0, 512, (2 * 2 * steps, 64), generator=torch.Generator().manual_seed(1))
    lines = [] if log is None else log
    cfg = TrainingConfig(output_dir="/nonexistent", max_steps=steps, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=1e-3, max_grad_norm=0.3, bf16=True,
                         save_strategy="no", gradient_checkpointing=True, disable_tqdm=True, seed=0,
                         warmup_steps=2, lr_scheduler_type="cosine", cuda_graphs=cuda_graphs)
    trainer = Trainer(model, BlockData(data), cfg, DistInfo(device=dev), ShardPlan("none"), writer=None,
                      log=lines.append)
    model.train()
    return [trainer.train_step() for _ in range(steps)], lines


def test_cuda_graph_training_steps_equal_eager_steps():
    """The captured step (forward, recompute, backward, clip, capturable AdamW, LR schedule) gives the eager run's
    curve: same losses, gradient norms and learning rates step by step."""
    eager, _ = _tiny_v2_lora_run(False, 0.0)
    graphed, lines = _tiny_v2_lora_run(True, 0.0)
    assert any("training step captured" in line for line in lines), lines
    for a, b in zip(eager, graphed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], rel=1e-6)
    assert eager[-1]["loss"] < eager[0]["loss"]


def test_cuda_graph_training_with_dropout_captures_or_says_why():
    """LoRA dropout draws random numbers inside checkpointed layers: either the step is captured (graph-safe RNG) or
    a notice says why not; training goes on and the loss stays finite either way."""
    steps, lines = _tiny_v2_lora_run(True, 0.1)
    assert any("training step captured" in line or "cuda graphs off" in line for line in lines), lines
    assert all(math.isfinite(s["loss"]) for s in steps)
