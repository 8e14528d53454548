"""PEFT round trip both ways on deepseek_v2 (MLA + MoE) and llama: adapters minke writes, routed experts
included, load with `PeftModel.from_pretrained` on transformers' classes and give minke's logits; adapters PEFT
writes (target_modules and target_parameters forms) load in minke with PEFT's logits."""

from __future__ import annotations

import json
import os

import pytest
import torch

import minke
from minke.train.lora import apply_lora, load_adapter, make_lora_config, merge_lora, save_adapter, adapter_state_dict
from tiny_models import make_checkpoint, make_sft_assets

torch.set_num_threads(1)
IDS = torch.tensor([[0, 9, 31, 150, 7, 64, 201, 3, 18]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _assert_same(a, b, rel=1e-5):
    err = (a - b).abs().max().item()
    assert err <= rel * b.abs().max().item(), f"logits differ by {err:.3e}"


def _hf(variant, path):
    import transformers

    cls = transformers.LlamaForCausalLM if variant == "llama" else transformers.DeepseekV2ForCausalLM
    return cls.from_pretrained(path).eval()


def _randomize_adapters(model, seed=0):
    """B = 0 at init makes every adapter a no-op: give all adapter weights random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (".lora" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def v2_base(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("v2"))
    make_checkpoint("deepseek_v2_lite", path, vocab_size=256, bos_token_id=0, eos_token_id=1)
    return path


@pytest.mark.parametrize("trainable,dropout", [
    ("all-linear", 0.05),  # attention, dense MLP, shared experts and routed experts
    ("q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj", 0.1),  # finetune.py's default list
    ("q_proj,kv_b_proj,experts.down_proj", 0.0),  # one expert target only
])
def test_minke_adapter_loads_in_peft_with_the_same_logits(v2_base, tmp_path, trainable, dropout):
    from peft import PeftModel

    model = minke.load_model(v2_base)
    cfg = make_lora_config(model, 4, 8, dropout, trainable, modules_to_save="")
    apply_lora(model, cfg)
    _randomize_adapters(model)
    model.eval()
    ours = _logits(model)
    assert not torch.allclose(ours, _logits(minke.load_model(v2_base))), "the adapter changes the model"
    out = str(tmp_path / "adapter")
    save_adapter(out, cfg, adapter_state_dict(model), v2_base)
    with open(os.path.join(out, "adapter_config.json")) as f:
        disk = json.load(f)
    if "experts" in trainable or trainable == "all-linear":
        assert any("experts" in t for t in disk["target_parameters"])
    hf = PeftModel.from_pretrained(_hf("deepseek_v2", v2_base), out).eval()
    _assert_same(_logits(hf), ours)
    # and back into minke: same logits, with the training dropout restored for a resumed run
    again = load_adapter(minke.load_model(v2_base), out)
    assert again.peft_config["default"].lora_dropout == dropout
    _assert_same(_logits(again.eval()), ours)
    _assert_same(_logits(merge_lora(again)), ours)


def test_routed_expert_adapters_train_inside_the_grouped_gemms(v2_base):
    model = minke.load_model(v2_base)
    apply_lora(model, make_lora_config(model, 4, 8, 0.0, "experts", modules_to_save=""))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".mlp.experts.lora." in n for n in trainable)
    model.train()
    out = model(IDS)
    out.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().max() > 0 for n, g in grads.items() if n.endswith("_B")), "B learns first (A random, B 0)"


@pytest.mark.parametrize("form", ["target_modules", "target_parameters"])
def test_peft_written_adapter_loads_in_minke(v2_base, tmp_path, form):
    from peft import LoraConfig, get_peft_model

    if form == "target_modules":  # transformers-v4 names; PEFT maps them onto the stacked experts (rank 2r gate_up)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                                                            "down_proj"], lora_dropout=0.0)
    else:
        cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["kv_a_proj_with_mqa"],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], lora_dropout=0.0)
    hf = get_peft_model(_hf("deepseek_v2", v2_base), cfg)
    _randomize_adapters(hf)
    out = str(tmp_path / "peft")
    hf.save_pretrained(out)
    ref = _logits(hf.eval())
    ours = load_adapter(minke.load_model(v2_base), out).eval()
    assert any(".mlp.experts.lora." in n for n, _ in ours.named_parameters())
    _assert_same(_logits(ours), ref)


def test_llama_adapter_round_trip(tmp_path):
    from peft import PeftModel

    base = str(tmp_path / "llama")
    make_checkpoint("llama", base)
    model = minke.load_model(base)
    cfg = make_lora_config(model, 4, 8, 0.1, "all-linear", modules_to_save="")
    apply_lora(model, cfg)
    _randomize_adapters(model)
    ours = _logits(model.eval())
    save_adapter(str(tmp_path / "a"), cfg, adapter_state_dict(model), base)
    _assert_same(_logits(PeftModel.from_pretrained(_hf("llama", base), str(tmp_path / "a")).eval()), ours)


def test_expert_names_on_a_dense_model_are_a_clear_error(tmp_path):
    base = str(tmp_path / "llama")
    make_checkpoint("llama", base)
    with pytest.raises(ValueError, match="no routed experts"):
        make_lora_config(minke.load_model(base), 4, 8, 0.0, "q_proj,experts")


def test_generate_on_an_adapter_dir_says_what_it_is(tmp_path, capsys):
    from minke.cli import main

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "/m/b"}))
    assert main(["generate", str(adapter), "--prompt", "hi"]) != 0
    err = capsys.readouterr().err
    assert "LoRA adapter" in err and "/m/b" in err and "--merge" in err and "no config.json" not in err


def test_merging_an_expert_adapter_writes_a_model_both_libraries_load(v2_base, tmp_path):
    from minke.train.finetune import merge_adapter

    model = minke.load_model(v2_base)
    cfg = make_lora_config(model, 4, 8, 0.0, "all-linear", modules_to_save="")
    apply_lora(model, cfg)
    _randomize_adapters(model, seed=5)
    ours = _logits(model.eval())
    out = str(tmp_path / "adapter")
    save_adapter(out, cfg, adapter_state_dict(model), v2_base)
    merged = merge_adapter(out, str(tmp_path / "merged"), log=lambda *a: None)
    _assert_same(_logits(minke.load_model(merged)), ours)
    _assert_same(_logits(_hf("deepseek_v2", merged)), ours)


def test_expert_target_names():
    from minke.config import config_from_dict
    from minke.loader import build_model
    from minke.train.lora import resolve_targets
    from tiny_models import config_dict

    v2 = build_model(config_from_dict(config_dict("deepseek_v2_lite")), torch.float32, "cpu")
    assert resolve_targets(v2, "q_proj,experts") == (["q_proj"], ["gate_up_proj", "down_proj"])
    assert resolve_targets(v2, "experts.gate_up_proj") == ([], ["gate_up_proj"])
    assert resolve_targets(v2, "gate_proj,experts.down_proj") == (["gate_proj"], ["down_proj"])
    linears, experts = resolve_targets(v2, "all-linear")
    assert experts == ["gate_up_proj", "down_proj"] and "lm_head" not in linears and "kv_b_proj" in linears
    llama = build_model(config_from_dict(config_dict("llama")), torch.float32, "cpu")
    assert resolve_targets(llama, "all-linear")[1] == []


def test_experts_only_adapter_with_modules_to_save_round_trips(v2_base, tmp_path):
    from peft import PeftModel

    model = minke.load_model(v2_base)
    cfg = make_lora_config(model, 4, 8, 0.0, "experts", modules_to_save="lm_head")
    apply_lora(model, cfg)
    _randomize_adapters(model, seed=2)
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ours = _logits(model.eval())
    out = str(tmp_path / "adapter")
    save_adapter(out, cfg, adapter_state_dict(model), v2_base)
    _assert_same(_logits(load_adapter(minke.load_model(v2_base), out).eval()), ours)
    _assert_same(_logits(PeftModel.from_pretrained(_hf("deepseek_v2", v2_base), out).eval()), ours)


@pytest.mark.parametrize("variant", ["deepseek", "deepseek_v2_lite"])
def test_finetune_cli_trains_expert_adapters_and_merges(variant, tmp_path):
    """End to end: `minke finetune --use_lora True --trainable all-linear` trains the routed experts' adapters
    (loss goes down), resumes nothing, writes a PEFT adapter; `--merge` gives a model with the adapter's logits."""
    from minke.cli import main

    qa = [("What do bees make?", "Bees make honey."), ("What color is the sky?", "The sky is blue."),
          ("What is ice made of?", "Ice is frozen water."), ("Name a primary color.", "Red is a primary color.")]
    base, data = make_sft_assets(tmp_path, qa, variant=variant)
    out = str(tmp_path / "out")
    assert main(["finetune", "--model_name_or_path", base, "--data_path", data, "--output_dir", out,
                 "--use_lora", "True", "--trainable", "all-linear", "--lora_r", "8", "--lora_alpha", "16",
                 "--modules_to_save", "", "--max_steps", "10", "--learning_rate", "1e-2", "--lora_dropout", "0", "--logging_steps", "1",
                 "--per_device_train_batch_size", "4", "--disable_tqdm", "True", "--seed", "0"]) == 0
    with open(os.path.join(out, "trainer_log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert log[-1]["ce_loss"] < 0.95 * log[0]["ce_loss"]
    model = load_adapter(minke.load_model(base), out).eval()
    experts = [p for n, p in model.named_parameters() if ".mlp.experts.lora." in n and n.endswith("_B")]
    assert experts and all(p.abs().max() > 0 for p in experts), "the expert adapters were trained"
    assert main(["finetune", "--merge", out, "--output_dir", str(tmp_path / "merged")]) == 0
    _assert_same(_logits(minke.load_model(str(tmp_path / "merged"))), _logits(model))
