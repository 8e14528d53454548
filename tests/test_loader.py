"""Config parsing and weight loading: every published form, every dtype, clear errors, streaming memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import minke
from minke.config import ConfigError, config_from_dict, load_config
from minke.loader import CheckpointError
from tiny_models import build_oracle, config_dict, make_checkpoint, save_checkpoint


def _ids(n=20):
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(0))


def test_rope_scaling_and_rope_parameters_forms_agree(tmp_path):
    old = config_dict("deepseek_v2_lite")
    new = dict(old)
    rs = new.pop("rope_scaling")
    new["rope_parameters"] = {"rope_type": rs["type"], "rope_theta": 10000.0,
                              **{k: v for k, v in rs.items() if k != "type"}}
    assert config_from_dict(old).rope == config_from_dict(new).rope
    assert config_from_dict(old).rope.type == "yarn" and config_from_dict(old).rope.factor == 40.0


def test_transformers_saved_checkpoint_loads(tmp_path):
    """transformers 5 save_pretrained writes rope_parameters and its own field set; minke loads it as is."""
    oracle, _ = build_oracle("deepseek_v2")
    oracle.save_pretrained(tmp_path)
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())
    model = minke.load_model(tmp_path)
    ids = _ids(60)
    with torch.no_grad():
        assert torch.allclose(model(ids), oracle(ids).logits, atol=1e-5)


@pytest.mark.parametrize("fmt,shards", [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 2)])
def test_weight_formats(tmp_path, fmt, shards):
    oracle, path = make_checkpoint("deepseek", str(tmp_path), fmt=fmt, shards=shards)
    if shards > 1:
        ext = "safetensors" if fmt == "safetensors" else "bin"
        assert any(f.endswith(f".{ext}.index.json") for f in os.listdir(path))
    model = minke.load_model(path)
    with torch.no_grad():
        assert torch.allclose(model(_ids()), oracle(_ids()).logits, atol=1e-5)


@pytest.mark.parametrize("saved,requested,expected", [
    (torch.bfloat16, "auto", torch.bfloat16), (torch.float16, "auto", torch.float16),
    (torch.float32, "auto", torch.float32), (torch.bfloat16, "float32", torch.float32),
    (torch.float32, torch.bfloat16, torch.bfloat16)])
def test_dtypes(tmp_path, saved, requested, expected):
    oracle, path = make_checkpoint("llama", str(tmp_path), dtype=saved)
    model = minke.load_model(path, dtype=requested)
    assert all(p.dtype == expected for p in model.parameters())
    with torch.no_grad():
        out = model(_ids()).float()
        ref = oracle.to(saved).to(expected)(_ids()).logits.float()
    assert torch.allclose(out, ref, atol=5e-2 if expected != torch.float32 else 1e-5)


def _write_cfg(path, **changes):
    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    cfg.update(changes)
    json.dump(cfg, open(cfg_file, "w"))
    return cfg_file


@pytest.mark.parametrize("changes,match", [
    ({"model_type": "mistral"}, "field 'model_type': unknown model_type 'mistral'"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "field 'rope_scaling': unsupported rope type 'longrope'"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "yarn needs 'original_max_position_embeddings'"),
    ({"hidden_act": "gelu"}, "field 'hidden_act'"),
    ({"hidden_size": "big"}, "field 'hidden_size': must be a positive integer"),
    ({"num_experts_per_tok": 99}, "field 'num_experts_per_tok'"),
    ({"topk_method": "noaux_tc"}, "field 'topk_method'"),
    ({"scoring_func": "sigmoid"}, "field 'scoring_func'"),
    ({"kv_lora_rank": None}, "field 'kv_lora_rank'"),
])
def test_bad_config_fails_naming_file_and_field(tmp_path, changes, match):
    _, path = make_checkpoint("deepseek_v2", str(tmp_path))
    cfg_file = _write_cfg(path, **changes)
    with pytest.raises(ConfigError, match=match) as e:
        minke.load_model(path)
    assert cfg_file in str(e.value)


def test_missing_and_malformed_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        minke.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


def test_shape_mismatch_lists_tensors(tmp_path):
    _, path = make_checkpoint("llama", str(tmp_path))
    _write_cfg(path, intermediate_size=100)
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.down_proj.weight: checkpoint \(64, 96\), "
                                              r"config expects \(64, 100\)"):
        minke.load_model(path)


def test_missing_and_unexpected_tensors_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = make_checkpoint("deepseek", str(tmp_path))
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    del sd["model.layers.1.mlp.experts.3.up_proj.weight"]
    sd["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # old checkpoints carry it: ignored
    save_file(sd, f)
    with pytest.raises(CheckpointError) as e:
        minke.load_model(path)
    msg = str(e.value)
    assert "missing 1 tensor(s): model.layers.1.mlp.experts.3.up_proj.weight" in msg
    assert "unexpected 1 tensor(s): model.layers.1.mlp.extra.weight" in msg


def test_no_weights_and_broken_index(tmp_path):
    _, path = make_checkpoint("llama", str(tmp_path), shards=2)
    os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="names shards that are not in"):
        minke.load_model(path)
    for f in os.listdir(path):
        if "safetensors" in f:
            os.remove(os.path.join(path, f))
    with pytest.raises(CheckpointError, match="no weights in"):
        minke.load_model(path)


def test_loading_streams_shard_by_shard(tmp_path):
    """Peak host memory while loading stays near the model plus one shard, not twice the model."""
    d = config_dict("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=8, vocab_size=32000)
    model, _ = build_oracle("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=8, vocab_size=32000)
    save_checkpoint(model, d, str(tmp_path), shards=8)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    del model
    script = textwrap.dedent(f"""
        import resource, torch, minke, safetensors.torch
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        m = minke.load_model({str(tmp_path)!r})
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(peak - base)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    growth = int(r.stdout.strip().splitlines()[-1])
    shard = model_bytes / 8
    assert growth < model_bytes + 2 * shard, f"peak grew {growth / 2**20:.0f} MiB for a {model_bytes / 2**20:.0f} MiB model"
