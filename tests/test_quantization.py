"""`--quantization fp8` (runner/quantization.py): MoE expert weights and MHA/GQA / dense-MLP linears as fp8 e4m3
with a scale per row, quantized at load. The oracle is the same model with those weights replaced by the
dequantized fp8 weights (what the fp8 path computes with), run through the plain reference model. The fused kernel's own test: test_kernel_fused_moe.py;
the GPU engine with fused shared experts and CUDA graphs: test_gpu.py."""

from __future__ import annotations

import sys

import pytest
import torch

import minke
from minke import LLM, SamplingParams
from minke.engine.config import EngineConfig
from minke.runner.quantization import FP8_MAX, dequantize_fp8, quantize_experts_fp8, quantize_fp8
from minke.models.attention import Attention
from minke.models.layers import MLP
from minke.models.moe import Experts, MoE, experts_reference
from test_engine import reference_greedy
from tiny_models import make_checkpoint


def test_quantize_fp8_error_bound_and_zero_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, 64, generator=g) * torch.logspace(-3, 1, 8)[:, None]  # rows of very different scales
    w[1, 2] = 0
    wq, scale = quantize_fp8(w)
    assert wq.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (3, 8)
    assert scale[1, 2] == 1 and (wq[1, 2].float() == 0).all()
    assert torch.allclose(wq.float().abs().amax(-1)[w.abs().amax(-1) > 0], torch.tensor(FP8_MAX))
    err = (dequantize_fp8(wq, scale, torch.float32) - w).abs()
    # half an ulp of 3 mantissa bits (2^-4 relative), or half the subnormal spacing (2^-10 of the row scale)
    assert (err <= w.abs() * 2**-4 + scale[..., None] * 2**-10 + 1e-12).all()


def test_experts_fp8_equal_dequantized_weights():
    g = torch.Generator().manual_seed(1)
    ex = Experts.__new__(Experts)
    torch.nn.Module.__init__(ex)
    ex.gate_up_proj = torch.nn.Parameter(torch.randn(4, 32, 24, generator=g) * 0.2)
    ex.down_proj = torch.nn.Parameter(torch.randn(4, 24, 16, generator=g) * 0.2)
    ex.register_buffer("gate_up_scale", None)
    ex.register_buffer("down_scale", None)
    ex.impl = experts_reference
    ex.quantize_fp8()
    assert ex.gate_up_proj.dtype == torch.float8_e4m3fn and ex.down_scale.shape == (4, 24)
    x = torch.randn(5, 24, generator=g)
    ids = torch.tensor([[0, 1], [3, 1], [2, 2], [0, 3], [1, 0]])
    w = torch.rand(5, 2, generator=g)
    want = experts_reference(x, dequantize_fp8(ex.gate_up_proj, ex.gate_up_scale, torch.float32),
                             dequantize_fp8(ex.down_proj, ex.down_scale, torch.float32), ids, w)
    torch.testing.assert_close(ex(x, ids, w), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ex(x, ids, w, reduce=False).sum(1), want, rtol=1e-5, atol=1e-6)


def dequantized_reference(path: str, device: str = "cpu", fuse_shared: bool = False) -> torch.nn.Module:
    """The plain fp32 model with every weight `--quantization fp8` quantizes replaced by its fp8 round trip: the
    experts' and the MHA/GQA attention and dense-MLP linears'. fuse_shared: the shared experts fused in first (at
    every step size), so they are quantized per fused expert row as on GPUs."""
    ref = minke.load_model(path, dtype=torch.float32, device=device)
    for m in ref.modules():
        if fuse_shared and isinstance(m, MoE):
            m.fuse_shared_experts(max_tokens=sys.maxsize)
    for m in ref.modules():
        if isinstance(m, Experts):
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(m, name)
                w.data = torch.stack([dequantize_fp8(*quantize_fp8(w[e]), torch.float32) for e in range(len(w))])
        if isinstance(m, (Attention, MLP)):
            for lin in m.children():
                if isinstance(lin, torch.nn.Linear):
                    lin.weight.data = dequantize_fp8(*quantize_fp8(lin.weight), torch.float32)
    return ref


PROMPTS = [[5, 17, 92, 3, 44, 8, 61], [70, 2, 19], list(range(40, 60))]


@pytest.mark.parametrize("variant", ["deepseek_v2_lite", "deepseek"])
def test_llm_fp8_greedy_equals_dequantized_reference(tmp_path, variant):
    path = str(tmp_path / variant)
    make_checkpoint(variant, path, tokenizer=True)
    llm = LLM(path, device="cpu", dtype="float32", quantization="fp8", kv_cache_tokens=512, block_size=4,
              max_num_batched_tokens=16)  # chunked prefill and batched decode
    moe_experts = [m for m in llm.llm_engine.runner.model.modules() if isinstance(m, Experts)]
    assert moe_experts and all(m.gate_up_proj.dtype == torch.float8_e4m3fn for m in moe_experts)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    ref = dequantized_reference(path)
    assert [o.outputs[0].token_ids for o in outs] == [reference_greedy(ref, p, 6) for p in PROMPTS]


def test_fused_shared_experts_fp8_at_every_size(tmp_path):
    """With the shared experts fused in, fp8 runs them through the experts at every step size (the long-prefill
    cuBLAS path would need their unquantized weights): a 9-token step past fused_max_tokens=4 still equals the
    unfused model on dequantized weights."""
    path = str(tmp_path / "m")
    make_checkpoint("deepseek_v2_lite", path)
    model = minke.load_model(path, dtype=torch.float32, device="cpu")
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    want_model = minke.load_model(path, dtype=torch.float32, device="cpu")
    want_moe = next(m for m in want_model.modules() if isinstance(m, MoE))
    assert moe.fuse_shared_experts(max_tokens=4)
    assert quantize_experts_fp8(model) == sum(isinstance(m, Experts) for m in model.modules())
    assert moe.fused_max_tokens > 9
    # the oracle: routed experts dequantized, shared experts = the fused ones' dequantized slices
    e = want_moe.experts.gate_up_proj.shape[0]
    gu = dequantize_fp8(moe.experts.gate_up_proj, moe.experts.gate_up_scale, torch.float32)
    dn = dequantize_fp8(moe.experts.down_proj, moe.experts.down_scale, torch.float32)
    want_moe.experts.gate_up_proj.data, want_moe.experts.down_proj.data = gu[:e].clone(), dn[:e].clone()
    s, inter = gu.shape[0] - e, dn.shape[-1]
    sh = want_moe.shared_experts
    sh.gate_proj.weight.data = gu[e:, :inter].reshape(s * inter, -1).clone()
    sh.up_proj.weight.data = gu[e:, inter:].reshape(s * inter, -1).clone()
    sh.down_proj.weight.data = dn[e:].transpose(0, 1).reshape(dn.shape[1], s * inter).clone()
    x = torch.randn(9, gu.shape[-1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], want_moe(x)[0], rtol=1e-5, atol=1e-5)


def test_quantization_errors(tmp_path):
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(model="m", device="cpu", quantization="int3")


@pytest.mark.parametrize("variant", ["llama", "llama_gqa"])
def test_dense_fp8_greedy_equals_dequantized_reference(tmp_path, variant):
    """DeepSeek LLM: --quantization fp8 swaps every attention and MLP linear for Fp8Linear (W8A16 on CPU: exact
    against the fp32 model on round-tripped weights); embeddings and lm_head stay."""
    from minke.runner.quantization import Fp8Linear

    path = str(tmp_path / variant)
    make_checkpoint(variant, path, tokenizer=True)
    llm = LLM(path, device="cpu", dtype="float32", quantization="fp8", kv_cache_tokens=512, block_size=4,
              max_num_batched_tokens=16)
    model = llm.llm_engine.runner.model
    lins = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(lins) == 7 * len(model.model.layers) and all(m.weight_fp8.dtype == torch.float8_e4m3fn for m in lins)
    assert not any(isinstance(m, torch.nn.Linear) for layer in model.model.layers for m in layer.modules())
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    ref = dequantized_reference(path)
    assert [o.outputs[0].token_ids for o in outs] == [reference_greedy(ref, p, 6) for p in PROMPTS]


def test_gpu_wiring_bf16_fp8_moe_matches_w8a8_reference(tmp_path):
    """What a bf16 GPU run executes, here under Triton's interpreter (compiled on a GPU): the kernels
    apply_gpu_kernels installs (shared experts fused, slot sums deferred, the fused MoE), then fp8 experts, so every
    MoE call goes Experts -> fused_moe with the scales and fp8 activations. Equal to the torch W8A8 reference."""
    pytest.importorskip("triton")
    from conftest import kernel_test_setup
    from minke.runner.gpu_kernels import apply_gpu_kernels, fuse_shared_experts
    from minke.kernels.fused_moe import _moe_grouped_gemm_kernel, fused_moe_ref

    dev, _, needs_triton = kernel_test_setup(_moe_grouped_gemm_kernel)
    if needs_triton.args[0]:
        pytest.skip(needs_triton.kwargs["reason"])
    path = str(tmp_path / "m")
    make_checkpoint("deepseek_v2_lite", path)
    fast = minke.load_model(path, dtype=torch.bfloat16, device=dev)
    apply_gpu_kernels(fast)
    quantize_experts_fp8(fast)
    ref = minke.load_model(path, dtype=torch.bfloat16, device=dev)
    fuse_shared_experts(ref)
    quantize_experts_fp8(ref)

    def w8a8(x, gate_up, down, topk_ids, topk_weights, gate_up_scale=None, down_scale=None):
        return fused_moe_ref(x, gate_up, down, topk_weights.float(), topk_ids, w13_scale=gate_up_scale,
                             w2_scale=down_scale, act_fp8=True)

    for m in ref.modules():
        if isinstance(m, Experts):
            m.impl = w8a8
    moe_fast = next(m for m in fast.modules() if isinstance(m, MoE))
    moe_ref = next(m for m in ref.modules() if isinstance(m, MoE))
    assert moe_fast.defer_slot_sum and moe_fast.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    g = torch.Generator().manual_seed(5)
    for n in (1, 6):
        x = torch.randn(n, moe_ref.experts.gate_up_proj.shape[-1], generator=g).to(torch.bfloat16).to(dev)
        with torch.no_grad():
            got = moe_fast(x)[0].float().sum(1)  # [N, K+S, D] per-slot outputs, summed by the next RMSNorm
            want = moe_ref(x)[0].float()
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2 * want.abs().max().item())


@pytest.mark.parametrize("variant", ["llama_gqa", "deepseek"])
def test_fused_projections_stay_fused_in_fp8(tmp_path, variant):
    """After gpu_kernels.transform_weights, fp8 quantizes the fused q/k/v and gate/up weights whole: each keeps its
    fp8 tensor with [N] row scales beside it, its projections' Fp8Linears hold views of them, the bits are those of
    quantizing each projection alone (row scales), and the model computes what the unfused fp8 model does."""
    from minke.runner.gpu_kernels import fuse_shared_experts, transform_weights
    from minke.runner.quantization import Fp8Linear, apply_quantization

    path = str(tmp_path / variant)
    make_checkpoint(variant, path)
    plain = minke.load_model(path, dtype=torch.float32)
    fuse_shared_experts(plain)  # transform_weights' other change (MoE models), so only the fusions differ
    n_plain = apply_quantization(plain, "fp8")
    fused = minke.load_model(path, dtype=torch.float32)
    transform_weights(fused)
    assert apply_quantization(fused, "fp8") == n_plain
    for layer_p, layer_f in zip(plain.model.layers, fused.model.layers):
        groups = [(layer_f.self_attn, "fused_in_weight", "fused_in_scale", ["q_proj", "k_proj", "v_proj"])]
        if isinstance(layer_f.mlp, MLP):
            groups.append((layer_f.mlp, "fused_gate_up", "fused_gate_up_scale", ["gate_proj", "up_proj"]))
        for mod, w_attr, s_attr, names in groups:
            wq, scale = getattr(mod, w_attr), getattr(mod, s_attr)
            assert wq.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (len(wq),)
            start = 0
            for name in names:
                lin = getattr(mod, name)
                assert isinstance(lin, Fp8Linear)
                assert lin.weight_fp8.data_ptr() == wq[start:].data_ptr()
                assert lin.weight_scale.data_ptr() == scale[start:].data_ptr()
                start += lin.out_features
            assert start == len(wq)
        for (name, a), (_, b) in zip(layer_p.named_buffers(), layer_f.named_buffers()):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    ids = torch.tensor([[5, 17, 42, 99, 3, 200, 7, 64]])
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), plain(ids), rtol=1e-5, atol=1e-5)
