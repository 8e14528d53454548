"""`minke train`: pretraining a small deepseek_v2 (MLA + MoE) from scratch: the loss goes down, the output is an
HF-format directory that minke and transformers load with identical logits, and the pieces (init, config, corpus,
schedules) behave as documented."""

from __future__ import annotations

import json
import os

import pytest
import torch

import minke
from minke.cli import main
from minke.tokenizer import Tokenizer
from minke.train.bpe import train_bpe_tokenizer
from minke.train.data import load_pretrain_blocks
from minke.train.pretrain import init_weights, parse_overrides, pretrain_config

torch.set_num_threads(1)  # tiny tensors: extra threads only contend on a shared CPU

STORY = ("Once upon a time a small fox lived in a quiet forest. Every morning the fox ran to the river to drink. "
         "One day the fox met a kind bear who shared berries with it. They became good friends and played all day.")
TINY = "hidden_size=64,num_hidden_layers=2,intermediate_size=96,moe_intermediate_size=32,n_routed_experts=4," \
       "num_experts_per_tok=2,kv_lora_rank=16,qk_nope_head_dim=16,qk_rope_head_dim=8,v_head_dim=16"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    tok = train_bpe_tokenizer([STORY] * 8, 300, str(d / "tok"))
    (d / "a.txt").write_text(STORY)
    with open(d / "b.jsonl", "w") as f:
        for s in STORY.split(". "):
            f.write(json.dumps({"text": s + "."}) + "\n")
        f.write(json.dumps({"title": "no text field"}) + "\n")
    return tok, str(d / "a.txt"), str(d / "b.jsonl")


def _train(tok, data, out, *extra) -> int:
    return main(["train", "--tokenizer_name", tok, "--data_path", *data, "--output_dir", out,
                 "--config_name", "deepseek_v2-micro", "--config_overrides", TINY, "--model_max_length", "32",
                 "--per_device_train_batch_size", "4", "--logging_steps", "1", "--disable_tqdm", "True",
                 "--seed", "0", *extra])


def test_pretrain_learns_and_output_reloads_in_minke_and_transformers(corpus, tmp_path):
    from transformers import DeepseekV2ForCausalLM

    tok, a, b = corpus
    out = str(tmp_path / "out")
    assert _train(tok, [a, b], out, "--max_steps", "12", "--learning_rate", "1e-2", "--warmup_steps", "2",
                  "--save_steps", "6", "--save_total_limit", "1", "--report_to", "tensorboard") == 0
    try:
        import tensorboard  # noqa: F401

        runs = os.path.join(out, "runs")
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(runs)), "tensorboard logs under runs/"
    except ImportError:
        pass  # without the package the run warns and keeps trainer_log.jsonl
    log = [json.loads(line) for line in open(os.path.join(out, "trainer_log.jsonl"))]
    assert len(log) == 12
    assert log[-1]["ce_loss"] < 0.6 * log[0]["ce_loss"], [r["ce_loss"] for r in log]
    assert log[0]["ce_loss"] == pytest.approx(torch.log(torch.tensor(320.0)).item(), rel=0.1), \
        "a fresh model predicts near-uniformly"
    assert all(r["aux_loss"] > 0 for r in log)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "deepseek_v2" and cfg["architectures"] == ["DeepseekV2ForCausalLM"]
    assert cfg["vocab_size"] == 320 and cfg["bos_token_id"] == 0 and cfg["eos_token_id"] == 1
    assert os.path.isfile(os.path.join(out, "generation_config.json"))
    assert [d for d in os.listdir(out) if d.startswith("checkpoint-")] == ["checkpoint-6"]

    ids = torch.tensor([Tokenizer.from_dir(out).encode("Once upon a time a small fox")])
    ours = minke.load_model(out)
    with torch.no_grad():
        a_logits, b_logits = ours(ids), DeepseekV2ForCausalLM.from_pretrained(out).eval()(ids).logits
    assert (a_logits - b_logits).abs().max() <= 1e-5 * b_logits.abs().max()
    # It learned the story: the next word after "a small" is "fox".
    fox = Tokenizer.from_dir(out).encode(" fox", add_special_tokens=False)[0]
    assert a_logits[0, -2].argmax().item() == fox


def test_init_weights_follow_the_reference_scheme():
    from minke.loader import build_model
    from minke.train.pretrain import build_config

    class Tok:
        vocab_size, bos_token_id, eos_token_id = 300, 0, 1

    raw = pretrain_config("deepseek_v2-micro", parse_overrides(TINY), Tok())
    model = init_weights(build_model(build_config(raw), torch.float32, "cpu"), 0.02, torch.Generator().manual_seed(0))
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() - 0.02) < 0.004 and abs(p.mean().item()) < 0.004, name


def test_config_presets_overrides_and_errors(tmp_path):
    class Tok:
        vocab_size, bos_token_id, eos_token_id = 1000, 5, 6

    raw = pretrain_config(None, parse_overrides("num_hidden_layers=3,seq_aux=false,topk_method=greedy"), Tok())
    assert raw["vocab_size"] == 1024 and raw["num_hidden_layers"] == 3 and raw["seq_aux"] is False
    assert raw["bos_token_id"] == 5 and raw["model_type"] == "deepseek_v2"
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        pretrain_config("deepseek_v2-micro", {"vocab_size": 512}, Tok())
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides("hidden_size")
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        pretrain_config("no-such-preset", {}, Tok())


def test_corpus_packing_and_errors(corpus, tmp_path):
    tok_dir, a, b = corpus
    tok = Tokenizer.from_dir(tok_dir)
    blocks = load_pretrain_blocks([a, b], tok, 16, log=lambda *_: None)
    stream = tok.encode(STORY) + [tok.eos_token_id]
    assert blocks.shape[1] == 16 and blocks[0].tolist() == stream[:16], "documents: bos, text, eos, packed in order"
    with pytest.raises(ValueError, match="fewer than one block"):
        load_pretrain_blocks([a], tok, 4096, log=lambda *_: None)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_pretrain_blocks([str(tmp_path / "empty.txt")], tok, 16, log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrain_blocks([str(tmp_path / "missing.txt")], tok, 16, log=lambda *_: None)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_schedules_match_transformers(kind):
    from transformers import get_scheduler

    from minke.train.optim import lr_lambda

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_scheduler(kind, opt, num_warmup_steps=3, num_training_steps=20)
    ours = lr_lambda(kind, 3 if kind != "constant" else 0, 20)
    for s in range(20):
        assert ours(s) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9), (kind, s)
        opt.step()
        ref.step()


def test_bad_flags_are_clear_errors(corpus, tmp_path, capsys):
    tok, a, _ = corpus
    assert _train(tok, [a], str(tmp_path / "o"), "--fp16", "True", "--bf16", "True") == 1
    assert "--bf16" in capsys.readouterr().err
    assert _train(tok, [a], str(tmp_path / "o"), "--per_device_train_batch_size", "0") == 1
    assert "must be positive" in capsys.readouterr().err
    assert _train(tok, [a], str(tmp_path / "o"), "--deepspeed", str(tmp_path / "nope.json")) == 1
    assert "no such file" in capsys.readouterr().err
