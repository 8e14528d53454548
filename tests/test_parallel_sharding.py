"""Sharding without processes: expert placement, clear errors for sizes that do not split, and the per-rank shards
(sliced from a loaded model, or read from the files) reassembling exactly into the checkpoint, with only the owned
slices read. The collectives are covered by test_parallel_multiproc.py."""

from __future__ import annotations

import pytest
import torch

import minke
from minke.config import config_from_dict
from minke.parallel.expert_parallel import ExpertPlacement
from minke.parallel.sharded_loading import LoadStats, load_sharded_model
from minke.parallel.sharding import checkpoint_plan
from minke.parallel.state import ParallelConfig, check_model_fits
from minke.parallel.tensor_parallel import kv_cache_config, shard_model
from minke.weights import hf_state_dict
from tiny_models import config_dict, make_checkpoint

FAMILIES = ["llama", "llama_gqa", "deepseek", "deepseek_v2_lite", "deepseek_v2"]
MOE = {"deepseek", "deepseek_v2_lite", "deepseek_v2"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache = {}

    def get(variant, **kw):
        key = (variant, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = make_checkpoint(variant, str(tmp_path_factory.mktemp(variant)), **kw)[1]
        return cache[key]

    return get


def test_balanced_placement():
    p = ExpertPlacement.balanced(160, 8)
    assert [len(p.owned(r)) for r in range(8)] == [20] * 8
    # V2: 8 groups of 20 experts -> one group per rank, so group-limited routing (topk_group 3) reaches <= 3 ranks.
    assert all({p.owner(e) for e in range(g * 20, (g + 1) * 20)} == {g} for g in range(8))
    uneven = ExpertPlacement.balanced(10, 4)
    assert [len(uneven.owned(r)) for r in range(4)] == [3, 3, 2, 2]
    owner, local = uneven.tables("cpu")
    for e in range(10):
        assert owner[e] == uneven.owner(e) and local[e] == uneven.local_index(e)
        assert uneven.owned(uneven.owner(e))[uneven.local_index(e)] == e
    with pytest.raises(ValueError, match="at least 4 experts"):
        ExpertPlacement.balanced(3, 4)


@pytest.mark.parametrize("overrides, tp, ep, match", [
    (dict(), 3, False, "num_attention_heads=4"),
    (dict(num_attention_heads=8, num_key_value_heads=4, hidden_size=64), 8, False, None),  # KV heads replicated
    (dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96), 6, False, None),
    (dict(num_attention_heads=12, num_key_value_heads=4, hidden_size=96), 6, False, "num_key_value_heads=4"),
    (dict(intermediate_size=90), 4, False, "intermediate_size=90"),
])
def test_dense_split_errors(overrides, tp, ep, match):
    cfg = config_from_dict(config_dict("llama", **overrides))
    if match is None:
        check_model_fits(cfg, ParallelConfig(tp, 0, ep))
    else:
        with pytest.raises(ValueError, match=match):
            check_model_fits(cfg, ParallelConfig(tp, 0, ep))


def test_moe_split_errors():
    cfg = config_from_dict(config_dict("deepseek_v2", moe_intermediate_size=30))
    with pytest.raises(ValueError, match="moe_intermediate_size=30.*or enable expert parallel"):
        check_model_fits(cfg, ParallelConfig(4, 0, False))
    check_model_fits(cfg, ParallelConfig(4, 0, True))  # whole experts per rank: their width does not matter
    many_heads = config_from_dict(config_dict("deepseek_v2", num_attention_heads=16))
    with pytest.raises(ValueError, match="at least 16 routed experts; n_routed_experts=8"):
        check_model_fits(many_heads, ParallelConfig(16, 0, True))
    with pytest.raises(ValueError, match="tp_rank 2 is outside"):
        ParallelConfig(2, 2)


def _cases():
    for v in FAMILIES:
        for world in (2, 4):
            yield v, world, False
            if v in MOE:
                yield v, world, True


@pytest.mark.parametrize("variant, world, ep", list(_cases()))
def test_rank_shards_reassemble_the_checkpoint(checkpoints, variant, world, ep):
    """For every rank: sharded loading == slicing the loaded model in place; over the ranks, split tensors
    concatenate back to the checkpoint's, replicated ones are equal everywhere, and each expert lives on one rank."""
    path = checkpoints(variant)
    full_model = minke.load_model(path)
    full = {k: v.clone() for k, v in hf_state_dict(full_model).items()}
    cfg = full_model.config
    placement = ExpertPlacement.balanced(cfg.n_routed_experts, world) if ep else None
    parts: dict[str, list] = {name: [] for name in full}
    for rank in range(world):
        p = ParallelConfig(world, rank, ep)
        loaded = load_sharded_model(path, p)
        sliced = shard_model(minke.load_model(path), p)
        a, b = dict(loaded.named_parameters()), dict(sliced.named_parameters())
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"rank {rank}: {k} differs between sharded loading and in-place slicing"
        params = dict(loaded.named_parameters(remove_duplicate=False))
        for name, entry in checkpoint_plan(cfg, p, placement).items():
            parts[name].append(None if entry is None else (entry, entry.target.view(params[entry.target.param])))
    for name, per_rank in parts.items():
        owned = [x for x in per_rank if x is not None]
        entry = owned[0][0]
        if entry.shard.dim is None:
            if ep and ".experts." in name and "shared" not in name:
                assert len(owned) == 1, f"{name}: expert held by {len(owned)} ranks"
            assert all(torch.equal(t, full[name]) for _, t in owned), f"{name}: replica differs from the checkpoint"
        else:
            whole = torch.cat([t for _, t in owned], dim=entry.shard.dim)
            if entry.padded:
                whole = whole[: full[name].shape[0]]
            if name.endswith(("k_proj.weight", "v_proj.weight")) and world > cfg.num_key_value_heads:
                # KV heads replicated over world / Hkv ranks: rank r holds head r * Hkv // world
                rep = world // cfg.num_key_value_heads
                whole = torch.cat([t for _, t in owned[::rep]], dim=0)
            assert torch.equal(whole, full[name]), f"{name}: shards do not reassemble the checkpoint tensor"


class _SpySafeOpen:
    """safetensors.safe_open that records the bytes of every slice indexed and forbids whole-tensor reads."""

    def __init__(self, real, log):
        self.real, self.log = real, log

    def __call__(self, *a, **kw):
        spy = self

        class Handle:
            def __enter__(self):
                self.f = spy.real(*a, **kw).__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_tensor(self, name):
                raise AssertionError(f"whole tensor {name} read by sharded loading")

            def get_slice(self, name):
                sl = self.f.get_slice(name)

                class Slice:
                    def __getitem__(self, idx):
                        t = sl[idx]
                        spy.log[name] = spy.log.get(name, 0) + t.numel() * t.element_size()
                        return t

                return Slice()

        return Handle()


@pytest.mark.parametrize("variant, ep", [("llama_gqa", False), ("deepseek_v2", False), ("deepseek_v2", True)])
def test_sharded_loading_reads_only_owned_slices(checkpoints, monkeypatch, variant, ep):
    import safetensors

    path = checkpoints(variant, shards=3)
    world = 4
    log_all = []
    for rank in range(world):
        log: dict[str, int] = {}
        monkeypatch.setattr(safetensors, "safe_open", _SpySafeOpen(safetensors.safe_open, log))
        stats = LoadStats()
        model = load_sharded_model(path, ParallelConfig(world, rank, ep), stats=stats)
        monkeypatch.undo()
        local_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        assert sum(log.values()) == stats.bytes_read == local_bytes  # exactly this rank's parameters came off disk
        if ep:
            assert stats.tensors_skipped and not any(n in log for n in stats.tensors_skipped)
        log_all.append(sum(log.values()))
    full_bytes = sum(p.numel() * p.element_size() for p in minke.load_model(path).parameters())
    assert max(log_all) < 0.5 * full_bytes


def test_bin_shards_load_sharded(checkpoints):
    path = checkpoints("deepseek", fmt="bin", shards=2)
    ref = shard_model(minke.load_model(path), ParallelConfig(2, 1, True))
    got = load_sharded_model(path, ParallelConfig(2, 1, True))
    for (k, a), (_, b) in zip(ref.named_parameters(), got.named_parameters()):
        assert torch.equal(a, b), k


def test_kv_cache_config_and_local_heads():
    gqa = config_from_dict(config_dict("llama_gqa"))  # 4 heads, 2 KV heads, head_dim 16
    for tp, kv in ((2, 1), (4, 1)):
        c = kv_cache_config(gqa, ParallelConfig(tp, 0))
        assert (c.num_key_value_heads, c.attn_head_dim, c.kv_cache_dim) == (kv, 16, 2 * kv * 16)
    mla = config_from_dict(config_dict("deepseek_v2"))
    assert kv_cache_config(mla, ParallelConfig(4, 0)).kv_cache_dim == mla.kv_lora_rank + mla.qk_rope_head_dim


def test_v2_236b_shapes_shard_on_meta():
    """The real V2 shape (2 of its 60 layers) splits over 8 ranks, TP and EP, without allocating anything."""
    from minke.loader import build_model

    cfg = config_from_dict(dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288, num_hidden_layers=2,
        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6,
        moe_intermediate_size=1536, first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=8,
        topk_group=3, routed_scaling_factor=16.0, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "mscale": 0.707, "mscale_all_dim": 0.707}))
    for ep in (False, True):
        m = shard_model(build_model(cfg, torch.bfloat16, "meta"), ParallelConfig(8, 3, ep))
        attn, moe = m.model.layers[1].self_attn, m.model.layers[1].mlp
        assert attn.num_heads == 16 and attn.q_b_proj.weight.shape == (16 * 192, 1536)
        assert attn.kv_b_proj.weight.shape == (16 * 256, 512) and attn.o_proj.weight.shape == (5120, 16 * 128)
        assert attn.kv_a_proj_with_mqa.weight.shape == (576, 5120)  # replicated: the latent every head reads
        assert m.model.embed_tokens.weight.shape == (12800, 5120) and m.lm_head.weight.shape == (12800, 5120)
        want = (20, 2 * 1536, 5120) if ep else (160, 2 * 192, 5120)
        assert moe.experts.gate_up_proj.shape == want


@pytest.mark.parametrize("ep", [False, True])
def test_dummy_weights_are_slices_of_one_model(checkpoints, ep):
    """load_format="dummy" (benchmarks): every rank's random shard is the slice of the same single-device model, so a
    sharded run can be checked against one device; the seed picks the model."""
    cfg = minke.load_config(checkpoints("deepseek_v2"))

    def dummy(p, seed=3):
        return load_sharded_model("unused", p, config=cfg, load_format="dummy", seed=seed)

    sliced = shard_model(dummy(ParallelConfig(1, 0)), ParallelConfig(2, 1, ep))
    for (k, a), (_, b) in zip(sliced.named_parameters(), dummy(ParallelConfig(2, 1, ep)).named_parameters()):
        assert torch.equal(a, b), k
    name = "model.layers.0.self_attn.o_proj.weight"
    w3, w4 = (dict(dummy(ParallelConfig(1, 0), s).named_parameters())[name] for s in (3, 4))
    assert not torch.equal(w3, w4) and 0.015 < w3.std().item() < 0.025
