"""Serving LoRA adapters offline (minke/lora/): an adapter's greedy tokens equal the merged model's and
transformers + PEFT's on the same adapter, for every family (routed experts included); a batch mixing the base and
several adapters equals each run alone; rsLoRA scaling; LRU eviction of device slots and host copies; the prefix
cache never shares blocks across adapters; unservable adapters are refused with the reason."""

from __future__ import annotations

import json
import os

import pytest
import torch

import minke
from minke import LLM, SamplingParams
from minke.lora import AdapterError, LoRARequest
from minke.train.lora import adapter_state_dict, apply_lora, make_lora_config, save_adapter
from lora_assets import LoRAAssets, randomize_adapters

torch.set_num_threads(1)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 17, 230, 99, 4, 61, 8], [300, 12, 12, 7, 1000, 45, 3, 88, 140, 9, 2, 71, 650], [42, 7]]
ENGINE = dict(device="cpu", block_size=4, kv_cache_tokens=4096, max_model_len=128)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return LoRAAssets(tmp_path_factory.mktemp("lora"))


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("variant", ["llama", "deepseek", "deepseek_v2_lite", "deepseek_v2"])
def test_adapter_tokens_equal_the_merged_model(assets, variant):
    """Attention (MHA or MLA: q / q_a / q_b, kv_a, kv_b, o), dense and shared MLPs and the routed experts."""
    base = assets(variant)
    a1, merged1 = assets.adapter(variant, seed=1)
    a2, merged2 = assets.adapter(variant, seed=2)
    llm = LLM(base, enable_lora=True, max_loras=2, max_lora_rank=8, **ENGINE)
    r1, r2 = LoRARequest("one", 1, a1), LoRARequest("two", 2, a2)
    base_alone = _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    one = _tokens(llm.generate(PROMPTS, GREEDY, lora_request=r1, use_tqdm=False))
    want_one = _tokens(LLM(merged1, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False))
    assert one == want_one
    assert one != base_alone, "the adapter changes the tokens"
    want_two = _tokens(LLM(merged2, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False))
    # one batch: base, adapter 1 and adapter 2 side by side, every prompt under each
    mixed = llm.generate(PROMPTS * 3, GREEDY, lora_request=[None] * 3 + [r1] * 3 + [r2] * 3, use_tqdm=False)
    got = _tokens(mixed)
    assert got[:3] == base_alone and got[3:6] == want_one and got[6:] == want_two


def _peft_greedy(hf, prompts, n):
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            g = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                            min_new_tokens=n, pad_token_id=0)
            out.append(g[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("variant", ["llama", "deepseek_v2_lite"])
def test_adapter_tokens_equal_transformers_with_peft(assets, variant):
    import transformers
    from peft import PeftModel

    base = assets(variant)
    adapter, _ = assets.adapter(variant, seed=3)
    cls = transformers.LlamaForCausalLM if variant == "llama" else transformers.DeepseekV2ForCausalLM
    hf = PeftModel.from_pretrained(cls.from_pretrained(base).eval(), adapter).eval()
    want = _peft_greedy(hf, PROMPTS, GREEDY.max_tokens)
    llm = LLM(base, enable_lora=True, max_lora_rank=4, **ENGINE)
    assert _tokens(llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest("a", 7, adapter), use_tqdm=False)) == want


def test_peft_written_rslora_adapter(assets, tmp_path):
    """An adapter PEFT itself writes, with use_rslora (scaling alpha / sqrt(r)): the same tokens as PEFT and as
    PEFT's merge."""
    import transformers
    from peft import LoraConfig, get_peft_model

    base = assets("llama")
    hf = get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base).eval(),
                        LoraConfig(r=8, lora_alpha=4, use_rslora=True, lora_dropout=0.0,
                                   target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "up_proj"]))
    randomize_adapters(hf, 11)
    adapter = str(tmp_path / "rs")
    hf.save_pretrained(adapter)
    assert json.load(open(os.path.join(adapter, "adapter_config.json")))["use_rslora"] is True
    hf.eval()
    want = _peft_greedy(hf, PROMPTS, GREEDY.max_tokens)
    llm = LLM(base, enable_lora=True, max_lora_rank=8, **ENGINE)
    got = _tokens(llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest("rs", 1, adapter), use_tqdm=False))
    assert got == want
    merged = str(tmp_path / "rs-merged")
    hf.merge_and_unload().save_pretrained(merged)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        os.link(os.path.join(base, f), os.path.join(merged, f))
    assert _tokens(LLM(merged, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)) == got


def test_lru_eviction_beyond_max_loras(assets):
    """Three adapters through one device slot and one host copy: each request still gets its own adapter (the
    scheduler never mixes more adapters in a step than there are slots; evicted host copies are read again)."""
    base = assets("deepseek_v2_lite")
    reqs, want = [], []
    for seed in (1, 2, 4):
        adapter, merged = assets.adapter("deepseek_v2_lite", seed=seed)
        reqs.append(LoRARequest(f"a{seed}", seed, adapter))
        want.append(_tokens(LLM(merged, **ENGINE).generate(PROMPTS[:2], GREEDY, use_tqdm=False)))
    llm = LLM(base, enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=4, **ENGINE)
    order = [0, 1, 2, 0]
    outs = llm.generate([p for _ in order for p in PROMPTS[:2]], GREEDY,
                        lora_request=[reqs[i] for i in order for _ in PROMPTS[:2]], use_tqdm=False)
    got = _tokens(outs)
    assert [got[2 * k: 2 * k + 2] for k in range(len(order))] == [want[i] for i in order]
    manager = llm.llm_engine.runner.executor.worker.lora
    assert manager.num_loads >= 3 and len(manager.cpu) == 1 and len(manager.slot_of) == 1
    assert llm.list_loras() == {1, 2, 4}


def test_prefix_cache_is_never_shared_between_adapters(assets):
    base = assets("deepseek_v2_lite")
    adapter, merged = assets.adapter("deepseek_v2_lite", seed=1)
    long_prompt = [PROMPTS[1] * 3]  # several full blocks
    want_base = _tokens(LLM(base, **ENGINE).generate(long_prompt, GREEDY, use_tqdm=False))
    want_adapter = _tokens(LLM(merged, **ENGINE).generate(long_prompt, GREEDY, use_tqdm=False))
    llm = LLM(base, enable_lora=True, max_lora_rank=4, **ENGINE)
    req = LoRARequest("a", 1, adapter)
    assert _tokens(llm.generate(long_prompt, GREEDY, lora_request=req, use_tqdm=False)) == want_adapter
    bm = llm.llm_engine.block_manager
    hits = bm.prefix_hits_tokens
    assert _tokens(llm.generate(long_prompt, GREEDY, use_tqdm=False)) == want_base
    assert bm.prefix_hits_tokens == hits, "the base request must not reuse the adapter's blocks"
    assert _tokens(llm.generate(long_prompt, GREEDY, lora_request=req, use_tqdm=False)) == want_adapter
    assert bm.prefix_hits_tokens > hits, "the same adapter's blocks are reused"


def test_unservable_adapters_are_refused_with_the_reason(assets, tmp_path):
    base = assets("deepseek_v2_lite")
    llm = LLM(base, enable_lora=True, max_lora_rank=4, **ENGINE)
    big, _ = assets.adapter("deepseek_v2_lite", seed=1, r=8)
    with pytest.raises(AdapterError, match="rank 8, above max_lora_rank 4"):
        llm.add_lora(LoRARequest("big", 1, big))
    dense, _ = assets.adapter("llama", seed=1)  # k_proj / v_proj: modules an MLA model does not have
    with pytest.raises(AdapterError, match="cannot serve adapters on"):
        llm.add_lora(LoRARequest("dense", 2, dense))
    model = minke.load_model(base)
    cfg = make_lora_config(model, 4, 8, 0.0, "q_proj", modules_to_save="lm_head")
    apply_lora(model, cfg)
    full = str(tmp_path / "full")
    save_adapter(full, cfg, adapter_state_dict(model), base)
    with pytest.raises(AdapterError, match="modules_to_save"):
        llm.add_lora(LoRARequest("full", 3, full))
    with pytest.raises(AdapterError, match="not a LoRA adapter directory"):
        llm.add_lora(LoRARequest("none", 4, str(tmp_path)))
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        LLM(base, **ENGINE).generate(PROMPTS[:1], GREEDY, lora_request=LoRARequest("x", 5, big), use_tqdm=False)
    # still serving
    assert llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.list_loras() == set()


@pytest.mark.parametrize("variant", ["deepseek_v2", "llama_gqa"])
def test_tensor_parallel_adapters_equal_one_process(assets, variant):
    """A/B sliced like the weights over two ranks (column-parallel B rows, row-parallel A columns, sliced experts,
    replicated KV heads of GQA): the same tokens as the merged model in one process."""
    import torch.distributed as dist

    base = assets(variant)
    adapter, merged = assets.adapter(variant, seed=5)
    want = _tokens(LLM(merged, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False))
    llm = LLM(base, tensor_parallel_size=2, enable_lora=True, max_lora_rank=4, **ENGINE)
    try:
        got = _tokens(llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest("a", 1, adapter), use_tqdm=False))
        assert got == want
    finally:
        llm.llm_engine.runner.shutdown()
    assert not dist.is_initialized()


@pytest.mark.parametrize("form", ["target_modules", "target_parameters"])
def test_peft_written_v2_adapters_with_experts(assets, tmp_path, form):
    """Adapters PEFT writes on transformers' DeepseekV2 class: its MoE shim maps gate/up/down target_modules onto
    the stacked experts (rank_pattern 2r for the fused gate_up); or the experts named as target_parameters."""
    import transformers
    from peft import LoraConfig, get_peft_model

    base = assets("deepseek_v2_lite")
    if form == "target_modules":
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                         target_modules=["q_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    else:
        cfg = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["kv_a_proj_with_mqa"],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    hf = get_peft_model(transformers.DeepseekV2ForCausalLM.from_pretrained(base).eval(), cfg)
    randomize_adapters(hf, 13)
    adapter = str(tmp_path / form)
    hf.save_pretrained(adapter)
    hf.eval()
    want = _peft_greedy(hf, PROMPTS, GREEDY.max_tokens)
    llm = LLM(base, enable_lora=True, max_lora_rank=8, **ENGINE)
    assert _tokens(llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest("p", 1, adapter), use_tqdm=False)) == want


@pytest.mark.parametrize("variant", ["llama", "deepseek_v2"])
def test_fused_input_projections_keep_their_adapters(assets, variant):
    """On GPUs q / k / v (MLA: q or q_a, and kv_a) run as one GEMM: each projection's adapter lands in its column
    slice of the fused output (here the same transform, applied to the CPU engine's model)."""
    from minke.runner.gpu_kernels import fuse_input_projections

    base = assets(variant)
    adapter, merged = assets.adapter(variant, seed=6)
    want = _tokens(LLM(merged, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False))
    llm = LLM(base, enable_lora=True, max_lora_rank=4, **ENGINE)
    assert fuse_input_projections(llm.llm_engine.runner.model) == llm.llm_engine.model_config.num_hidden_layers
    assert _tokens(llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest("a", 1, adapter), use_tqdm=False)) == want


def test_the_embedded_default_model_serves_an_adapter(tmp_path):
    """The 9M deepseek_v2 model shipped in the package, with an adapter minke's fine-tuning code writes (every
    Linear and the routed experts): chat prompts through LLM.chat, tokens equal to the merged model's."""
    from minke.default_model import default_model_dir
    from minke.train.finetune import merge_adapter

    base = default_model_dir()
    model = minke.load_model(base)
    cfg = make_lora_config(model, 8, 16, 0.0, "all-linear", modules_to_save="")
    apply_lora(model, cfg)
    randomize_adapters(model, 21, scale=0.05)
    adapter = str(tmp_path / "adapter")
    save_adapter(adapter, cfg, adapter_state_dict(model), base)
    merged = merge_adapter(adapter, str(tmp_path / "merged"), log=lambda *a: None)
    msgs = [[{"role": "user", "content": "Tell me a story about a cat."}], [{"role": "user", "content": "Hi!"}]]
    params = SamplingParams(temperature=0, max_tokens=12)
    want = [o.outputs[0].token_ids for o in LLM(merged, device="cpu").chat(msgs, params, use_tqdm=False)]
    llm = LLM(device="cpu", enable_lora=True, max_lora_rank=8)
    got = llm.chat(msgs, params, use_tqdm=False, lora_request=LoRARequest("story", 1, adapter))
    assert [o.outputs[0].token_ids for o in got] == want
    assert [o.outputs[0].token_ids for o in llm.chat(msgs, params, use_tqdm=False)] != want
