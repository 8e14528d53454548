"""minke's logits equal the transformers oracle's on tiny random checkpoints of every family and variant
(SPEC §4), and cached (paged) step-by-step decoding equals the full forward."""

from __future__ import annotations

import pytest
import torch

import minke
from minke.models.attention import MLAttention
from minke.runner.input_batch import SeqChunk, make_forward_batch
from minke.runner.kv_cache import allocate_kv_caches
from tiny_models import VARIANTS, make_checkpoint

YARN = {"deepseek_v2_lite", "deepseek_v2"}


def assert_close_logits(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4):
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3e} > {rel} x logits scale {scale:.3e}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (oracle, path), built once per module."""
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = make_checkpoint(variant, str(tmp_path_factory.mktemp(variant)))
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_full_forward_matches_oracle(checkpoints, variant):
    oracle, path = checkpoints(variant)
    model = minke.load_model(path)
    # YaRN configs have original_max_position_embeddings 32: 300 positions run far past it.
    # The dynamic-NTK variant has max_position_embeddings 64: 100 positions grow its base.
    seq = 300 if variant in YARN else (100 if "dynamic" in variant else 48)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, seq), generator=g)
    with torch.no_grad():
        ref = oracle(ids).logits
        out = model(ids)
    assert out.shape == ref.shape == (3, seq, 256)
    assert_close_logits(out, ref)
    assert torch.equal(out.argmax(-1), ref.argmax(-1)), "greedy tokens differ from the oracle"


def _paged_logits(model, prompts: list[list[int]], chunk: int, n_decode: int, block_size: int = 4):
    """Run prompts through the paged path: chunked prefill, then greedy decode step by step, sequences batched
    together (mixing decodes with prefill chunks). Returns per-sequence list of logits rows [pos, V] computed in
    paged mode at every position, and the full token lists."""
    cfg = model.config
    caches = allocate_kv_caches(cfg, num_blocks=64, block_size=block_size, dtype=torch.float32, device="cpu")
    tokens = [list(p) for p in prompts]
    done = [0] * len(prompts)  # tokens in cache
    tables = [list(range(i * 16, (i + 1) * 16)) for i in range(len(prompts))]  # shuffled below
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(64, generator=g).tolist()
    tables = [[perm[b] for b in t] for t in tables]
    rows = [dict() for _ in prompts]
    target = [len(p) + n_decode for p in prompts]
    while any(len(t) < target[i] or done[i] < len(t) for i, t in enumerate(tokens)):
        chunks, who = [], []
        # decodes first, then prefill chunks (the ForwardBatch contract)
        order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]) - done[i] != 1)
        for i in order:
            todo = len(tokens[i]) - done[i]
            if todo == 0:
                continue
            n = min(todo, chunk)
            chunks.append(SeqChunk(tokens[i][done[i]: done[i] + n], done[i], tables[i], sample=done[i] + n == len(tokens[i])))
            who.append((i, done[i] + n))
        ids, batch = make_forward_batch(chunks, caches, block_size, "cpu")
        with torch.no_grad():
            logits = model(ids, batch=batch)
        k = 0
        for (i, end), c in zip(who, chunks):
            done[i] = end
            if c.sample:
                rows[i][end - 1] = logits[k]
                k += 1
                if len(tokens[i]) < target[i]:
                    tokens[i].append(int(logits[k - 1].argmax()))
    return rows, tokens


@pytest.mark.parametrize("variant", ["llama_gqa", "deepseek", "deepseek_v2_lite", "deepseek_v2"])
def test_paged_decode_matches_full_forward(checkpoints, variant):
    """Chunked prefill + step-by-step cached decoding (absorbed MLA for V2) equals the dense forward."""
    _, path = checkpoints(variant)
    model = minke.load_model(path)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (11, 5, 17)]
    rows, tokens = _paged_logits(model, prompts, chunk=6, n_decode=7)
    for i, toks in enumerate(tokens):
        with torch.no_grad():
            full = model(torch.tensor([toks]))[0]
        for pos, row in rows[i].items():
            assert_close_logits(row, full[pos])
        # every generated token was the dense forward's greedy choice
        for pos in range(len(prompts[i]) - 1, len(toks) - 1):
            assert toks[pos + 1] == int(full[pos].argmax())


def test_absorbed_mla_decode_equals_naive(checkpoints):
    """One MLA layer: decoding one token through the latent cache with kv_b_proj absorbed gives the same output
    as the naive form that expands per-head K/V."""
    _, path = checkpoints("deepseek_v2")
    model = minke.load_model(path)
    attn = model.model.layers[0].self_attn
    torch.manual_seed(3)
    x = torch.randn(1, 9, model.config.hidden_size)
    with torch.no_grad():
        naive = attn(x)[0]  # [9, D], dense naive path
        caches = allocate_kv_caches(model.config, 8, 4, torch.float32, "cpu")
        table = [5, 2, 7]
        _, b1 = make_forward_batch([SeqChunk(list(range(8)), 0, table)], caches, 4, "cpu")
        attn(x[0, :8], batch=b1)  # prefill writes the latent cache
        _, b2 = make_forward_batch([SeqChunk([0], 8, table)], caches, 4, "cpu")
        assert b2.num_decodes == 1
        absorbed = attn(x[0, 8:9], batch=b2)
    assert torch.allclose(absorbed[0], naive[8], atol=1e-5, rtol=1e-4)
    # the cache holds only the latent: kv_lora_rank + rope dims per token
    assert caches[0].shape[-1] == model.config.kv_lora_rank + model.config.qk_rope_head_dim


@pytest.mark.parametrize("variant", ["deepseek_v2_lite", "deepseek_v2", "llama_gqa", "deepseek"])
def test_fused_input_projections_equal_separate(checkpoints, variant):
    """fuse_input_projections: one GEMM for MLA's q (or q_a, with a q LoRA) and kv_a, or for MHA / GQA's q, k and v,
    gives the separate projections' paged output and cache; the modules' weights become views of the fused tensor
    in row order (no extra memory, checkpoint names kept)."""
    _, path = checkpoints(variant)
    model = minke.load_model(path)
    attn = model.model.layers[0].self_attn
    names = sorted(model.state_dict())
    torch.manual_seed(4)
    x = torch.randn(7, model.config.hidden_size)

    def paged_out():
        caches = allocate_kv_caches(model.config, 8, 4, torch.float32, "cpu")
        _, b = make_forward_batch([SeqChunk(list(range(7)), 0, [3, 1])], caches, 4, "cpu")
        with torch.no_grad():
            return attn(x, batch=b), caches[0].clone()

    before, cache_before = paged_out()
    assert attn.fuse_input_projections() and not attn.fuse_input_projections()
    after, cache_after = paged_out()
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache_after, cache_before, atol=1e-5, rtol=1e-5)
    if isinstance(attn, MLAttention):
        projs = [attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj, attn.kv_a_proj_with_mqa]
    else:
        projs = [attn.q_proj, attn.k_proj, attn.v_proj]
    start = 0
    for p in projs:
        assert p.weight.data_ptr() == attn.fused_in_weight[start:].data_ptr()
        start += p.out_features
    assert sorted(model.state_dict()) == names


@pytest.mark.parametrize("variant", ["llama_gqa", "deepseek"])
def test_fused_gate_up_equals_separate(checkpoints, variant):
    """MLP.fuse_gate_up: one GEMM of x for gate_proj and up_proj gives the separate projections' MLP output, dense
    and paged-shaped ([B, T, D] and [N, D]); gate/up become views of the fused weight in row order (no extra
    memory, checkpoint names kept); a second call, or an MLP with a non-Linear projection, changes nothing."""
    from minke.models.layers import MLP

    _, path = checkpoints(variant)
    model = minke.load_model(path)
    mlp = model.model.layers[0].mlp  # dense in both (the MoE model's first layer is dense)
    assert isinstance(mlp, MLP)
    names = sorted(model.state_dict())
    torch.manual_seed(5)
    xs = [torch.randn(2, 3, model.config.hidden_size), torch.randn(7, model.config.hidden_size)]
    with torch.no_grad():
        before = [mlp(x) for x in xs]
        assert mlp.fuse_gate_up() and not mlp.fuse_gate_up()
        after = [mlp(x) for x in xs]
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    inter = mlp.gate_proj.out_features
    assert mlp.fused_gate_up.shape == (2 * inter, model.config.hidden_size) and mlp.fused_gate_up_scale is None
    assert mlp.gate_proj.weight.data_ptr() == mlp.fused_gate_up.data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp.fused_gate_up[inter:].data_ptr()
    assert sorted(model.state_dict()) == names
    other = model.model.layers[1].mlp
    if isinstance(other, MLP):
        other.up_proj = torch.nn.Identity()
        assert not other.fuse_gate_up() and other.fused_gate_up is None


@pytest.mark.parametrize("variant", ["deepseek_v2", "deepseek", "llama_gqa"])
def test_gpu_kernel_wiring_matches_reference_on_cpu(checkpoints, variant):
    """The kernels the runner installs on GPU (apply_gpu_kernels: shared experts fused into the fused MoE, fused
    add+RMSNorm, Triton router, fused input projections, one-row GEMVs; the Triton backend's MLA or MHA/GQA paged
    decode) run here under TRITON_INTERPRET and give the reference's logits through prefill + paged decode
    (compiled and on the GPU when there is one)."""
    pytest.importorskip("triton")
    from conftest import kernel_test_setup
    from minke.models.attention import TritonAttentionBackend
    from minke.runner.gpu_kernels import apply_gpu_kernels
    from minke.kernels.fused_moe import _moe_grouped_gemm_kernel
    from minke.models.moe import MoE

    dev, _, needs_triton = kernel_test_setup(_moe_grouped_gemm_kernel)  # compiled on a GPU, interpreted on CPU
    if needs_triton.args[0]:
        pytest.skip(needs_triton.kwargs["reason"])

    _, path = checkpoints(variant)
    ref = minke.load_model(path, device=dev)
    fast = minke.load_model(path, device=dev)
    apply_gpu_kernels(fast)
    moes = [m for m in fast.modules() if isinstance(m, MoE)]
    if variant != "llama_gqa":  # the tiny MoE models have shared experts: they were folded in
        assert moes and all(m.n_fused_shared for m in moes)
    assert all(layer.self_attn.fused_in_weight is not None for layer in fast.model.layers)
    assert fast.model.layers[0].mlp.fused_gate_up is not None  # a dense MLP in every family: gate/up fused
    caches = allocate_kv_caches(fast.config, 16, 4, torch.float32, dev)
    prompt = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(4)).tolist()
    table = [3, 9, 1, 12]
    ids, b = make_forward_batch([SeqChunk(prompt, 0, table)], caches, 4, dev, TritonAttentionBackend())
    with torch.no_grad():
        first = fast(ids, batch=b)[0]
        nxt = int(first.argmax())
        ids, b = make_forward_batch([SeqChunk([nxt], 9, table)], caches, 4, dev, TritonAttentionBackend())
        second = fast(ids, batch=b)[0]
        full = ref(torch.tensor([prompt + [nxt]], device=dev))[0]
    assert_close_logits(first, full[8])
    assert_close_logits(second, full[9])
