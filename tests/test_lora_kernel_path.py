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


@pytest.mark.skipif(not HAS_TRITON or (not torch.cuda.is_available()
                                       and type(_shrink_kernel).__name__ != "InterpretedFunction"),
                    reason="needs triton (its interpreter on CPU: TRITON_INTERPRET=1 before triton's import)")
@pytest.mark.parametrize("variant", ["llama", "deepseek_v2_lite"])
def test_kernel_path_tokens_equal_the_merged_model(tmp_path, monkeypatch, variant):
    """llama: fused q/k/v input projection (one stacked shrink and one block-diagonal expand), dense MLPs (one
    shrink for gate/up). deepseek_v2_lite: MLA (fused q + kv_a, absorbed decode's per-head rows, kv_b on prefill
    contexts), shared experts, routed experts inside fused_moe."""
    import minke.kernels.fused_moe as fm
    import minke.lora.layers as layers

    calls = {"shrink": 0, "per_head": 0, "experts": 0}

    def counted(fn, key):
        def wrapper(*a, **kw):
            calls[key] += 1
            if kw.get("groups", 1) > 1:
                calls["per_head"] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(layers, "lora_shrink", counted(layers.lora_shrink, "shrink"))
    monkeypatch.setattr(fm, "lora_shrink_moe", counted(fm.lora_shrink_moe, "experts"))
    assets = LoRAAssets(tmp_path)
    base = assets(variant)
    a1, merged1 = assets.adapter(variant, seed=1)
    a2, merged2 = assets.adapter(variant, seed=2)
    want = [_tokens(LLM(m, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)) for m in (base, merged1, merged2)]
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
    assert calls["shrink"] and calls["stacked"] and bool(calls["per_head"]) == moe and bool(calls["experts"]) == moe, calls
