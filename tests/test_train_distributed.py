"""Several processes on CPU (torchrun, gloo): 2 processes follow the same loss curve as 1 process with the same
global batch, for FSDP2 full sharding (pretraining), the ZeRO-2 mapping (LoRA) and the ZeRO-0 mapping (DDP, full
fine-tuning); DeepSpeed configs map onto FSDP2 as documented."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import minke
from minke.cli import main
from minke.train.bpe import train_bpe_tokenizer
from minke.train.distributed import plan_sharding
from tiny_models import make_checkpoint

torch.set_num_threads(1)

TEXT = ["The fox runs to the river.", "The bear eats red berries.", "Birds sing in the tall trees.",
        "Fish swim in the cold lake.", "The sun rises over the hills.", "Rain falls on the green grass.",
        "The owl sleeps during the day.", "Wolves howl at the bright moon."]
TINY = "hidden_size=64,num_hidden_layers=2,intermediate_size=96,moe_intermediate_size=32,n_routed_experts=4," \
       "num_experts_per_tok=2,kv_lora_rank=16,qk_nope_head_dim=16,qk_rope_head_dim=8,v_head_dim=16"


def _ds_config(tmp_path, stage: int, offload: bool = False) -> str:
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    path = tmp_path / f"ds_zero{stage}.json"
    path.write_text(json.dumps({"bf16": {"enabled": "auto"}, "zero_optimization": zero,
                                "train_micro_batch_size_per_gpu": "auto"}))
    return str(path)


def test_deepspeed_stages_map_onto_fsdp2_and_ddp(tmp_path):
    p3 = plan_sharding(2, _ds_config(tmp_path, 3))
    assert (p3.strategy, p3.reshard_after_forward) == ("fsdp", True) and "FSDP2" in p3.notice
    p2 = plan_sharding(4, _ds_config(tmp_path, 2, offload=True))
    assert (p2.strategy, p2.reshard_after_forward, p2.cpu_offload) == ("fsdp", False, True)
    assert plan_sharding(2, _ds_config(tmp_path, 0)).strategy == "ddp"
    assert plan_sharding(2, None).strategy == "fsdp", "several processes shard fully by default"
    assert plan_sharding(2, _ds_config(tmp_path, 2), quantized=True).strategy == "ddp", "4-bit bases replicate"
    single = plan_sharding(1, _ds_config(tmp_path, 3))
    assert single.strategy == "none" and "single process" in single.notice
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 5}}))
    with pytest.raises(ValueError, match="stage must be 0-3"):
        plan_sharding(2, str(bad))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    tok = train_bpe_tokenizer(TEXT * 4, 300, str(d / "tok"))
    corpus = d / "corpus.jsonl"
    sft = d / "sft.jsonl"
    with open(corpus, "w") as f, open(sft, "w") as g:
        for t in TEXT:
            f.write(json.dumps({"text": t}) + "\n")
            g.write(json.dumps({"instruction": f"Tell me about {t.split()[1]}.", "output": t}) + "\n")
    base = str(d / "base")
    # aux_loss_alpha 0 for the fine-tuning comparisons: micro-batches are right-padded to their own longest example,
    # pad tokens are routed and enter the balance loss (as in DeepSeek's modeling code), so a batch split in two
    # pads differently and the aux term differs by ~1e-5. Packed pretraining (no padding) checks the aux loss.
    make_checkpoint("deepseek_v2_lite", base, vocab_size=320, bos_token_id=0, eos_token_id=1, aux_loss_alpha=0.0)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok, f), os.path.join(base, f))
    return {"tok": tok, "corpus": str(corpus), "sft": str(sft), "base": base}


def _torchrun(args: list[str], nproc: int = 2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "minke.cli", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _losses(out: str) -> list[float]:
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "trainer_log.jsonl"))]


def _common(out: str, batch: int) -> list[str]:
    return ["--output_dir", out, "--per_device_train_batch_size", str(batch), "--logging_steps", "1",
            "--disable_tqdm", "True", "--seed", "0", "--max_steps", "5", "--save_steps", "100"]


def _compare(one: str, two: str, lora: bool = False):
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 5
    assert a[-1] < a[0], "it trains"
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5), (a, b)
    if lora:
        from safetensors.torch import load_file

        wa, wb = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (one, two))
        assert wa.keys() == wb.keys()
        for k in wa:
            # Adam normalises each update, so reduction-order rounding in near-zero gradients shows at ~1e-5.
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)
        return
    ids = torch.tensor([[0, 7, 99, 13, 250, 4]])
    with torch.no_grad():
        la, lb = minke.load_model(one)(ids), minke.load_model(two)(ids)
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)


def test_fsdp2_pretraining_matches_one_process(assets, tmp_path):
    args = ["train", "--tokenizer_name", assets["tok"], "--data_path", assets["corpus"], "--config_name",
            "deepseek_v2-micro", "--config_overrides", TINY, "--model_max_length", "8", "--learning_rate", "1e-2"]
    one, two, three = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "three")
    assert main(args + _common(one, 4)) == 0
    r = _torchrun(args + _common(two, 2) + ["--save_steps", "3"])
    assert "FSDP2 over 2 processes" in r.stderr
    _compare(one, two)
    # A checkpoint written by 2 FSDP processes (optimizer state gathered by parameter name) resumes in 1 process
    # and continues the same curve.
    assert main(args + _common(three, 4) + ["--resume_from_checkpoint", os.path.join(two, "checkpoint-3")]) == 0
    assert _losses(three) == pytest.approx(_losses(one)[3:], rel=1e-5)


def test_zero2_lora_and_zero0_full_finetune_match_one_process(assets, tmp_path):
    base = ["finetune", "--model_name_or_path", assets["base"], "--data_path", assets["sft"]]
    # learning_rate 5e-3 and adam_epsilon 1e-5: with Adam's default eps 1e-8 the first steps move every weight by
    # ~lr * sign(g), so a gradient element near zero whose sign flips under a different reduction order (2 processes'
    # all-reduce vs one sum) moves its weight by 2 * lr; at lr 1e-2 the curve also stops falling by step 5, where
    # small differences grow. Either made the curves part at ~1e-5 by step 4, machine-dependently (CI failed so).
    # A larger eps makes the update continuous in g for |g| << eps, so rounding stays rounding: the curves below
    # agree to 6 digits on every step.
    lora = ["--use_lora", "True", "--lora_dropout", "0", "--learning_rate", "5e-3", "--adam_epsilon", "1e-5",
            "--deepspeed", _ds_config(tmp_path, 2)]
    one, two = str(tmp_path / "lora1"), str(tmp_path / "lora2")
    assert main(base + lora + _common(one, 4)) == 0
    r = _torchrun(base + lora + _common(two, 2))
    assert "ZeRO-2" in r.stderr and "FSDP2" in r.stderr
    _compare(one, two, lora=True)

    full = ["--learning_rate", "3e-3", "--gradient_accumulation_steps", "2", "--deepspeed", _ds_config(tmp_path, 0)]
    one, two = str(tmp_path / "full1"), str(tmp_path / "full2")
    assert main(base + full + _common(one, 2)) == 0
    r = _torchrun(base + full + _common(two, 1))
    assert "DDP" in r.stderr
    _compare(one, two)
