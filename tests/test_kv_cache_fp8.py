"""--kv-cache-dtype fp8 end to end on tiny checkpoints of every family: the paged model over an fp8 cache (MLA's
latent with a scale per token; MHA / GQA K and V with a scale per token and KV head) on the torch backend and the
Triton backend (through the interpreter) against the dense reference forward; long cached contexts attended in
pieces (memory flat in the context) giving the one-shot result; the engine option and its capacity."""

from __future__ import annotations

import pytest
import torch

import minke
import minke.kernels.mla_decode as _kmod
from conftest import kernel_test_setup
from minke import LLM
from minke.engine.config import EngineConfig
from minke.kernels import latent_cache
from minke.models.attention import Attention, MLAttention, TorchAttentionBackend, TritonAttentionBackend
from minke.runner.input_batch import SeqChunk, make_forward_batch
from minke.runner.kv_cache import allocate_kv_caches, resolve_kv_cache_dtype
from tiny_models import make_checkpoint

DEVICE, INTERPRETED, needs_triton = kernel_test_setup(_kmod._mla_decode_kernel)


def _paged_logits(model, prompt, chunk, n_decode, kv_dtype, backend, block_size=4, num_blocks=40, forced=None):
    """Chunked prefill of `prompt`, then n_decode decode steps (greedy, or the tokens `forced` gives), over a paged
    cache of kv_dtype. Returns the logits of every position computed [T, vocab] and the tokens."""
    caches = allocate_kv_caches(model.config, num_blocks, block_size, kv_dtype, DEVICE)
    table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).tolist()
    tokens, done, rows = list(prompt), 0, []
    while done < len(prompt) + n_decode:
        n = min(chunk, len(tokens) - done)
        ids, batch = make_forward_batch([SeqChunk(tokens[done:done + n], done, table)], caches, block_size, DEVICE,
                                        backend)
        batch.logits_indices = None
        with torch.no_grad():
            logits = model(ids, batch=batch)  # [n, vocab] (all rows: logits_indices None)
        rows.append(logits.reshape(-1, logits.shape[-1])[-n:])
        done += n
        if done == len(tokens) and len(tokens) < len(prompt) + n_decode:
            tokens.append(int(rows[-1][-1].argmax()) if forced is None else forced[len(tokens)])
    return torch.cat(rows), tokens


@pytest.fixture(scope="module")
def v2_lite(tmp_path_factory):
    _, path = make_checkpoint("deepseek_v2_lite", str(tmp_path_factory.mktemp("v2lite")), tokenizer=True)
    return path


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_cache_logits_close_to_the_dense_forward(v2_lite, kv_dtype):
    model = minke.load_model(v2_lite, device=DEVICE)
    prompt = torch.randint(2, model.config.vocab_size, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    full, tokens32 = _paged_logits(model, prompt, chunk=7, n_decode=6, kv_dtype=torch.float32,
                                   backend=TorchAttentionBackend())
    got, _ = _paged_logits(model, prompt, chunk=7, n_decode=6, kv_dtype=kv_dtype, backend=TorchAttentionBackend(),
                           forced=tokens32)  # teacher-forced: the same tokens, so the logits compare row by row
    with torch.no_grad():
        dense = model(torch.tensor([tokens32], device=DEVICE))[0]  # [T, vocab]
    torch.testing.assert_close(full, dense, rtol=1e-4, atol=1e-4)  # the fp32 cache is the reference itself
    err = (got - dense).abs().max().item()
    spread = dense.std().item()
    # fp8 rounding of the latents moves the logits by a little, not by their spread
    assert 0 < err < (0.15 if kv_dtype == torch.float8_e4m3fn else 0.3) * spread, (err, spread)


def _fused_prologue_model(path, fused: bool):
    """The model at path; fused: with its family's fused prologue swapped in (MLA or MHA / GQA)."""
    from minke.runner.gpu_kernels import use_fused_mha_prologue, use_fused_mla_prologue

    model = minke.load_model(path, device=DEVICE)
    if fused:
        (use_fused_mla_prologue if model.config.is_mla else use_fused_mha_prologue)(model)
    return model


def _check_triton_backend_reads_the_fp8_cache_like_torch(path):
    ref, fast = _fused_prologue_model(path, False), _fused_prologue_model(path, True)
    prompt = list(range(3, 14))
    a, ta = _paged_logits(ref, prompt, chunk=5, n_decode=4, kv_dtype=torch.float8_e4m3fn,
                          backend=TorchAttentionBackend())
    b, tb = _paged_logits(fast, prompt, chunk=5, n_decode=4, kv_dtype=torch.float8_e4m3fn,
                          backend=TritonAttentionBackend())
    assert ta == tb
    torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)


@needs_triton
def test_triton_backend_reads_the_fp8_cache_like_the_torch_backend(v2_lite):
    """The decode kernel (dequantization fused) and the fused prologue's fp8 write inside the model, against the
    torch backend over the same fp8 cache format."""
    _check_triton_backend_reads_the_fp8_cache_like_torch(v2_lite)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float8_e4m3fn])
def test_long_context_prefill_in_pieces_equals_one_shot(v2_lite, kv_dtype):
    """Chunks after a cached prefix longer than prefix_chunk_tokens attend over it piece by piece, merged by their
    log-sum-exps: the same logits as the whole context at once."""
    model = minke.load_model(v2_lite, device=DEVICE)
    prompt = list(range(2, 40))
    whole, _ = _paged_logits(model, prompt, chunk=9, n_decode=0, kv_dtype=kv_dtype, backend=TorchAttentionBackend())
    layers = [m for m in model.modules() if isinstance(m, MLAttention)]
    calls = []
    for m in layers:
        m.prefix_chunk_tokens = 5  # 38-token contexts: up to 6 pieces of 5 before the chunk's own 9 tokens
        inner = m._prefill_long_context
        m._prefill_long_context = lambda *a, inner=inner, **k: calls.append(1) or inner(*a, **k)
    pieces, _ = _paged_logits(model, prompt, chunk=9, n_decode=0, kv_dtype=kv_dtype, backend=TorchAttentionBackend())
    assert calls  # the piecewise path ran
    torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=1e-4)


def test_engine_option_capacity_and_errors(v2_lite, tmp_path, caplog):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(model=v2_lite, kv_cache_dtype="int8")
    gib = 1 / 256
    auto = LLM(v2_lite, device="cpu", kv_cache_gib=gib, max_model_len=64, max_num_seqs=1024)
    with caplog.at_level("INFO", logger="minke"):
        fp8 = LLM(v2_lite, device="cpu", kv_cache_gib=gib, max_model_len=64, max_num_seqs=1024,
                  kv_cache_dtype="fp8")
    a, b = auto.llm_engine.runner, fp8.llm_engine.runner
    assert fp8.llm_engine.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    width = auto.llm_engine.model_config.kv_cache_dim
    ratio = latent_cache.bytes_per_token(width, torch.float32) / latent_cache.bytes_per_token(width,
                                                                                                torch.float8_e4m3fn)
    assert b.capacity_tokens == pytest.approx(a.capacity_tokens * ratio, rel=0.02)
    assert f"{ratio:.2f}x the tokens of float32" in caplog.text
    # greedy decoding runs end to end over the fp8 cache
    sp = minke.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = fp8.generate([{"prompt_token_ids": list(range(3, 20))}], sp)[0].outputs[0].token_ids
    ref = auto.generate([{"prompt_token_ids": list(range(3, 20))}], sp)[0].outputs[0].token_ids
    assert len(out) == 8 and out[0] == ref[0]


@pytest.fixture(scope="module", params=["llama_gqa", "deepseek"])
def mha_family(request, tmp_path_factory):
    """DeepSeek LLM's family (llama, GQA here) and DeepSeekMoE's (deepseek: MHA attention, MoE layers)."""
    _, path = make_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param)), tokenizer=True)
    return path


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_mha_fp8_cache_logits_close_to_the_dense_forward(mha_family, kv_dtype):
    """Chunked prefill (cached prefixes read back from the fp8 cache), then decodes, teacher-forced on the fp32
    cache's greedy tokens: each logits row within a small part of their spread of the dense forward's."""
    model = minke.load_model(mha_family, device=DEVICE)
    assert isinstance(model.model.layers[0].self_attn, Attention)
    prompt = torch.randint(2, model.config.vocab_size, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    full, tokens32 = _paged_logits(model, prompt, chunk=7, n_decode=6, kv_dtype=torch.float32,
                                   backend=TorchAttentionBackend())
    got, _ = _paged_logits(model, prompt, chunk=7, n_decode=6, kv_dtype=kv_dtype, backend=TorchAttentionBackend(),
                           forced=tokens32)
    with torch.no_grad():
        dense = model(torch.tensor([tokens32], device=DEVICE))[0]
    torch.testing.assert_close(full, dense, rtol=1e-4, atol=1e-4)
    err, spread = (got - dense).abs().max().item(), dense.std().item()
    assert 0 < err < (0.15 if kv_dtype == torch.float8_e4m3fn else 0.3) * spread, (err, spread)


@needs_triton
def test_mha_triton_backend_and_fused_prologue_read_the_fp8_cache_like_torch(mha_family):
    """The decode kernel (scales folded into scores and probabilities) and the fused prologue's fp8 write and
    dequantized K / V inside the model, against the torch backend over the same fp8 cache format."""
    _check_triton_backend_reads_the_fp8_cache_like_torch(mha_family)


def test_mha_engine_option_capacity(mha_family, caplog):
    """--kv-cache-dtype fp8 on an MHA / GQA model: the fp8 cache tensors, (hd * 4) / fp8_row_width(hd) times the
    fp32 tokens in the same memory (head 64 here: 256 / 80 = 3.2x), said in the log, and greedy decoding end to
    end (the first token equal to the fp32 cache's)."""
    gib = 1 / 256
    auto = LLM(mha_family, device="cpu", kv_cache_gib=gib, max_model_len=64, max_num_seqs=1024)
    with caplog.at_level("INFO", logger="minke"):
        fp8 = LLM(mha_family, device="cpu", kv_cache_gib=gib, max_model_len=64, max_num_seqs=1024,
                  kv_cache_dtype="fp8_e4m3")
    cache = fp8.llm_engine.runner.kv_caches[0]
    hd = fp8.llm_engine.model_config.attn_head_dim
    assert cache.dtype == torch.float8_e4m3fn and cache.shape[-1] == latent_cache.fp8_row_width(hd)
    ratio = 4 * hd / latent_cache.fp8_row_width(hd)
    assert fp8.llm_engine.runner.capacity_tokens == pytest.approx(auto.llm_engine.runner.capacity_tokens * ratio,
                                                                   rel=0.02)
    assert f"a scale per token and KV head): {ratio:.2f}x the tokens of float32" in caplog.text
    sp = minke.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(3, 20))}, {"prompt_token_ids": list(range(5, 9))}]
    out = [o.outputs[0].token_ids for o in fp8.generate(prompts, sp)]
    ref = [o.outputs[0].token_ids for o in auto.generate(prompts, sp)]
    assert [len(o) for o in out] == [8, 8] and [o[0] for o in out] == [r[0] for r in ref]


def test_resolve_kv_cache_dtype():
    """The flag's values for any family (the MHA / GQA ones end to end: test_mha_engine_option_capacity)."""
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16) == torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("fp8_e5m2", torch.bfloat16) == torch.float8_e5m2
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        resolve_kv_cache_dtype("fp4", torch.bfloat16)
