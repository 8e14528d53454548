"""The multi-LoRA kernel path of every adapted module (kernels/lora.py through lora/layers.py: linear projections,
MLA's kv_b_proj in absorbed decode and prefill contexts, the routed experts inside fused_moe) gives the merged
model's greedy tokens, in a batch mixing the base model and two adapters. On CPU the kernels run in Triton's
interpreter (conftest.py); the engine is built with the torch path, then switched to the kernels."""

from __future__ import annotations

import pytest
import torch

from minke import LLM, SamplingParams
from minke.kernels._triton import HAS_TRITON
from minke.kernels.lora import _shrink_kernel
from minke.lora import LoRARequest
from lora_assets import LoRAAssets

torch.set_num_threads(1)
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
PROMPTS = [[5, 17, 230, 99, 4, 61, 8], [300, 12, 12, 7, 1000, 45, 3, 88, 140], [42, 7]]
ENGINE = dict(device="cpu", block_size=4, kv_cache_tokens=4096, max_model_len=128)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """variant -> (base dir, adapter 1 dir, adapter 2 dir, the base / merged 1 / merged 2 models' greedy tokens):
    built once per variant for the module (the checkpoints, the adapters and their merged models' reference tokens
    are the same for every test of a variant)."""
    assets, built = LoRAAssets(tmp_path_factory.mktemp("lora")), {}

    def get(variant):
        if variant not in built:
            base = assets(variant)
            a1, merged1 = assets.adapter(variant, seed=1)
            a2, merged2 = assets.adapter(variant, seed=2)
            want = [_tokens(LLM(m, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False))
                    for m in (base, merged1, merged2)]
            built[variant] = base, a1, a2, want
        return built[variant]

    return get


@pytest.mark.skipif(not HAS_TRITON or (not torch.cuda.is_available()
                                       and type(_shrink_kernel).__name__ != "InterpretedFunction"),
                    reason="needs triton (its interpreter on CPU: TRITON_INTERPRET=1 before triton's import)")
@pytest.mark.parametrize("variant", ["llama", "deepseek_v2_lite"])
def test_kernel_path_tokens_equal_the_merged_model(references, monkeypatch, variant):
    """llama: fused q/k/v input projection (one stacked shrink and one block-diagonal expand), dense MLPs (one
    shrink for gate/up). deepseek_v2_lite: MLA (fused q + kv_a, absorbed decode's per-head rows, kv_b on prefill
    contexts), shared experts, routed experts inside fused_moe."""
    import minke.kernels.fused_moe as fm
    import minke.lora.layers as layers

    calls = {"shrink": 0, "per_head": 0, "experts": 0, "bmm": 0}

    def counted(fn, key):
        def wrapper(*a, **kw):
            calls[key] += 1
            if kw.get("groups", 1) > 1:
                calls["per_head"] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(layers, "lora_shrink", counted(layers.lora_shrink, "shrink"))
    monkeypatch.setattr(layers, "lora_shrink_expand", counted(layers.lora_shrink_expand, "per_head"))
    monkeypatch.setattr(layers, "lora_bmm", counted(layers.lora_bmm, "bmm"))  # absorbed decode: bmm + adapter, one launch
    fused = fm.fused_moe

    def fused_counted(*a, **kw):  # the experts' adapters ride its grouped GEMMs (their shrinks in the K loops)
        calls["experts"] += kw.get("lora") is not None
        return fused(*a, **kw)

    monkeypatch.setattr(fm, "fused_moe", fused_counted)
    import minke.kernels.rmsnorm as rn

    norm = rn.rmsnorm

    def norm_counted(*a, **kw):  # o_proj's (and dense down_proj's) expand inside the next add + RMSNorm, the
        calls["norm_expand"] += kw.get("lora") is not None  # fused input projection's shrink inside the one before
        calls["norm_shrink"] += kw.get("shrink") is not None
        return norm(*a, **kw)

    calls["norm_expand"] = calls["norm_shrink"] = 0
    monkeypatch.setattr(rn, "rmsnorm", norm_counted)
    base, a1, a2, want = references(variant)
    llm = LLM(base, enable_lora=True, max_loras=2, max_lora_rank=8, **ENGINE)
    model = llm.llm_engine.runner.executor.worker.model
    ctx = model.lora_layers.ctx
    assert not ctx.use_kernels  # CPU: built on the torch path
    ctx.use_kernels = True
    from minke.runner.gpu_kernels import fuse_input_projections

    assert fuse_input_projections(model)  # as the GPU build does (the adapters' stacks were made for it)
    stacked_b = [m.lora_stacked[1] for m in model.modules() if getattr(m, "lora_stacked", None) is not None]
    assert stacked_b and any(isinstance(m, layers.LoRAMLP) for m in model.modules())
    apply = layers.LoRAContext.apply

    def apply_counted(self, x, y, a, b, idx):
        calls["stacked"] += any(b is s for s in stacked_b)
        return apply(self, x, y, a, b, idx)

    calls["stacked"] = 0
    monkeypatch.setattr(layers.LoRAContext, "apply", apply_counted)
    r1, r2 = LoRARequest("one", 1, a1), LoRARequest("two", 2, a2)
    got = _tokens(llm.generate(PROMPTS * 3, GREEDY, lora_request=[None] * 3 + [r1] * 3 + [r2] * 3, use_tqdm=False))
    assert got[:3] == want[0] and got[3:6] == want[1] and got[6:] == want[2]
    assert want[1] != want[0], "the adapter changes the tokens"
    moe = variant != "llama"
    # the stacked shrink of the fused input projection rides the input norm in every step; its block-diagonal
    # expand follows the projection (no ctx.apply of the stacked B any more)
    assert calls["shrink"] and calls["norm_shrink"] and calls["norm_expand"] and not calls["stacked"], calls
    assert bool(calls["bmm"]) == moe and bool(calls["experts"]) == moe, calls


@pytest.mark.skipif(not HAS_TRITON or (not torch.cuda.is_available()
                                       and type(_shrink_kernel).__name__ != "InterpretedFunction"),
                    reason="needs triton (its interpreter on CPU: TRITON_INTERPRET=1 before triton's import)")
@pytest.mark.parametrize("variant,swaps", [("deepseek_v2_lite", False), ("deepseek_v2_lite", True),
                                           ("deepseek", True)])
def test_gpu_build_with_shared_experts_folded(references, monkeypatch, variant, swaps):
    """The GPU build with LoRA on CPU (model_builder: fused input projections, shared experts folded into the
    routed stacks with their adapters in the folded experts' rows; swaps: every GPU kernel swap too, run by Triton's
    interpreter: the one-row GEMV before o_proj's / down_proj's adapters, deferred MoE slot sums, fused router and
    MLA prologue): the kernel path and the torch path both give the merged model's tokens in a mixed batch."""
    import minke.runner.gpu_kernels as gk
    import minke.runner.model_builder as mb
    from minke.models.moe import MoE

    base, a1, a2, want = references(variant)
    monkeypatch.setattr(mb, "gpu_kernels_available", lambda device: True)  # the transforms (no GPU kernel swaps)
    if swaps:
        monkeypatch.setattr(gk, "gpu_kernels_available", lambda device: True)
    llm = LLM(base, enable_lora=True, max_loras=2, max_lora_rank=8, **ENGINE)
    model = llm.llm_engine.runner.executor.worker.model
    assert all(m.n_fused_shared and m.shared_experts is None for m in model.modules() if isinstance(m, MoE))
    assert model.lora_layers.shared and any(getattr(m, "fused_in_weight", None) is not None for m in model.modules())
    ctx = model.lora_layers.ctx
    r1, r2 = LoRARequest("one", 1, a1), LoRARequest("two", 2, a2)
    for kernels in (True, False) if not swaps else (True,):
        ctx.use_kernels = kernels
        got = _tokens(llm.generate(PROMPTS * 3, GREEDY, lora_request=[None] * 3 + [r1] * 3 + [r2] * 3,
                                   use_tqdm=False))
        assert got[:3] == want[0] and got[3:6] == want[1] and got[6:] == want[2], kernels
    if swaps:  # one-row steps: the GEMV (here on CPU, interpreted) with every slot's A as extra rows (o_proj,
        # down_proj: their expand in the next add + RMSNorm), or with the expand of the shrink the input norm did
        # in its epilogue (the fused input projection)
        import minke.kernels.gemv as gemv_mod

        def cpu_gemv_applies(x, w):
            return x.dim() == 2 and x.shape[0] <= gemv_mod.GEMV_MAX_ROWS and x.stride(1) == 1 and w.stride(1) == 1

        extra_rows, lora_ranks = [], []
        gemv = gemv_mod.gemv

        def counted_gemv(x, w, config=None, extra=None, lora=None):
            extra_rows.append(0 if extra is None else extra.shape[0])
            lora_ranks.append(0 if lora is None else lora[0].shape[1])
            return gemv(x, w, config, extra=extra, lora=lora)

        silu_mul = gemv_mod.gemv_silu_mul
        silu_mul_lora = []

        def counted_silu_mul(x, w, scale=None, config=None, lora=None):  # a dense MLP's gate_up + its expand
            silu_mul_lora.append(lora is not None)
            return silu_mul(x, w, scale, config, lora=lora)

        def cpu_few_rows(x, w, max_rows):
            return x.dim() == 2 and x.shape[0] <= max_rows and x.stride(1) == 1 and w.stride(1) == 1

        monkeypatch.setattr(gemv_mod, "gemv_applies", cpu_gemv_applies)
        monkeypatch.setattr(gemv_mod, "_few_rows", cpu_few_rows)
        monkeypatch.setattr(gemv_mod, "gemv", counted_gemv)
        monkeypatch.setattr(gemv_mod, "gemv_silu_mul", counted_silu_mul)
        one = llm.generate(PROMPTS[:1], GREEDY, lora_request=r1, use_tqdm=False)
        assert _tokens(one) == want[1][:1]
        assert set(extra_rows) - {0} == {2 * 8}, extra_rows  # o_proj / down_proj: S*R rows more
        parts = 2 if variant.startswith("deepseek_v2") else 3  # MLA: q + kv_a; MHA: q, k, v
        assert set(lora_ranks) - {0} == {parts * 8}, lora_ranks  # the fused input: its stacked ranks
        assert any(silu_mul_lora), silu_mul_lora  # the dense layer's gate_up GEMV with its adapters' expand
    for w in model.lora_layers.experts.values():  # the shared MLP's adapters sit in the folded experts' rows
        for stack in (w.gate_up_a, w.gate_up_b, w.down_a, w.down_b):
            assert stack[w.e: w.e_total].abs().sum() > 0 and stack[w.e_total + w.e: 2 * w.e_total].abs().sum() > 0


@pytest.mark.parametrize("kernels", [False, True])
def test_folded_shared_expert_adapters_equal_the_merged_mlp(kernels):
    """ExpertSlotWeights with shared experts folded in: each fused expert j gets columns [j*I, (j+1)*I) of the
    shared MLP's gate/up B and down A, gate and up their own A's (rank 2R stacks), so the fused MoE's folded slots
    (weight 1) sum to the shared MLP with its adapters merged; routed experts keep theirs."""
    if kernels and (not HAS_TRITON or (not torch.cuda.is_available()
                                       and type(_shrink_kernel).__name__ != "InterpretedFunction")):
        pytest.skip("needs triton (its interpreter on CPU)")
    from minke.kernels.fused_moe import fused_moe, moe_experts_torch
    from minke.kernels.lora import MoELoRA, fused_moe_lora_ref
    from minke.lora.layers import ExpertSlotWeights, SharedFold

    g = torch.Generator().manual_seed(0)
    t, k, e, d, i, n_sh, r, slots = 5, 2, 4, 32, 16, 2, 4, 2
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    x, w13, w2 = rnd(t, d), rnd(e, 2 * i, d), rnd(e, d, i)
    wg, wu, wd = rnd(n_sh * i, d), rnd(n_sh * i, d), rnd(d, n_sh * i)  # the shared MLP
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(torch.int32)
    wts = torch.rand(t, k, generator=g)
    routed = {"gate_up_proj": (rnd(e, r, d), rnd(e, 2 * i, r)), "down_proj": (rnd(e, r, i), rnd(e, d, r))}
    shared = {"gate_proj": (rnd(r, d), rnd(n_sh * i, r)), "up_proj": (rnd(r, d), rnd(n_sh * i, r)),
              "down_proj": (rnd(r, n_sh * i), rnd(d, r))}
    w = ExpertSlotWeights(slots, 8, e, d, i, i, torch.float32, "cpu", shared=SharedFold(n_sh, n_sh * i))
    w.write(1, routed, shared)
    # folded weights (MoE.fuse_shared_experts' layout) and the router's extra slots (ids e.., weight 1)
    f13 = torch.cat([w13, torch.cat([wg.view(n_sh, i, d), wu.view(n_sh, i, d)], 1)])
    f2 = torch.cat([w2, wd.view(d, n_sh, i).transpose(0, 1)])
    fids = torch.cat([ids, torch.arange(e, e + n_sh, dtype=torch.int32).expand(t, n_sh)], 1)
    fwts = torch.cat([wts, torch.ones(t, n_sh)], 1)
    tok_slots = torch.tensor([1, -1, 1, 1, -1], dtype=torch.int32)
    lora = MoELoRA(tok_slots, w.gate_up_a, w.gate_up_b, w.down_a, w.down_b, use_kernels=kernels)
    if kernels:
        got = fused_moe(x, f13, f2, fwts, fids, lora=lora)
    else:
        got = fused_moe_lora_ref(x, f13, f2, fwts, fids, lora)
    for tok in range(t):
        m13, m2, sg, su, sd = w13.clone(), w2.clone(), wg.clone(), wu.clone(), wd.clone()
        if tok_slots[tok] >= 0:
            m13 += routed["gate_up_proj"][1] @ routed["gate_up_proj"][0]
            m2 += routed["down_proj"][1] @ routed["down_proj"][0]
            sg += shared["gate_proj"][1] @ shared["gate_proj"][0]
            su += shared["up_proj"][1] @ shared["up_proj"][0]
            sd += shared["down_proj"][1] @ shared["down_proj"][0]
        xt = x[tok: tok + 1]
        want = moe_experts_torch(xt, m13, m2, wts[tok: tok + 1], ids[tok: tok + 1])
        want = want + (torch.nn.functional.silu(xt @ sg.t()) * (xt @ su.t())) @ sd.t()
        torch.testing.assert_close(got[tok: tok + 1], want, rtol=1e-4, atol=1e-4)
