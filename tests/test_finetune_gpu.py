"""`minke finetune` on CUDA (skipped without a GPU): DeepSeek's own ZeRO-3 config in one process and in two
(FSDP2), bf16, its WarmupLR schedule, and a SIGKILLed GPU run resuming on the same curve (GPU kernels are not
bitwise deterministic, so curves are compared with a tolerance here; tests/test_finetune_faults.py holds the
bit-exact CPU version)."""

from __future__ import annotations

import json
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
