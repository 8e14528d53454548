"""`--quantization fp8` quantizes while loading (runner/model_builder.load_quantized): each decoder layer is
allocated when its first tensor arrives, and once complete gets the kernels' weight transforms and is quantized,
so the device peak is ~ the fp8 model + a layer in bf16 (DeepSeek LLM 67B on one H200). Checked here, on CPU:

- the model quantized while loading equals, bit for bit (fp32, W8A16), the model loaded whole and then quantized
  (the pipeline before: load -> gpu_kernels.transform_weights -> apply_quantization), for every family, with real
  checkpoints and dummy weights, with and without the weight transforms, at TP=1 and TP=2 (gloo);
- the peak of tensor bytes alive during a bf16 load stays below the fp8 model + 2 bf16 layers, which loading whole
  and then quantizing exceeds.
"""

from __future__ import annotations

import datetime
import gc
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from minke.config import load_config
from minke.parallel.state import ParallelConfig
from minke.runner.gpu_kernels import transform_weights
from minke.runner.model_builder import load_quantized, load_unquantized
from minke.runner.quantization import Fp8Linear, apply_quantization
from tiny_models import make_checkpoint

VARIANTS = ["llama", "llama_gqa", "deepseek", "deepseek_v2_lite"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {v: make_checkpoint(v, str(tmp_path_factory.mktemp(v)))[1] for v in VARIANTS}


def worker_cfg(path: str, load_format: str) -> SimpleNamespace:
    """The WorkerConfig fields model_builder reads."""
    return SimpleNamespace(model=path, load_format=load_format, seed=3, quantization="fp8", setup=None)


def quantized_after_load(cfg, parallel: ParallelConfig, dtype: torch.dtype, fuse: bool):
    """The reference: the whole model loaded in `dtype`, then transformed and quantized model-wide."""
    model = load_unquantized(cfg, load_config(cfg.model), parallel, dtype, torch.device("cpu"))
    if fuse:
        transform_weights(model)
    n = apply_quantization(model, "fp8", parallel)
    return model, n


def quantized_while_loading(cfg, parallel: ParallelConfig, dtype: torch.dtype, fuse: bool):
    return load_quantized(cfg, load_config(cfg.model), parallel, dtype, torch.device("cpu"), fuse_weights=fuse)


def assert_same_model(got, want, what: str) -> None:
    """Same parameters and buffers (non-persistent ones too: the experts' scales), same dtypes, same bits, and the
    same modules (Fp8Linear where the reference has one), and the same logits."""
    for kind in ("named_parameters", "named_buffers"):
        g = dict(getattr(got, kind)(remove_duplicate=False))
        w = dict(getattr(want, kind)(remove_duplicate=False))
        assert g.keys() == w.keys(), f"{what}: {kind} differ: {sorted(g.keys() ^ w.keys())}"
        for name in w:
            assert g[name].dtype == w[name].dtype, f"{what}: {name} is {g[name].dtype}, want {w[name].dtype}"
            assert g[name].shape == w[name].shape, f"{what}: {name} shape {g[name].shape}, want {w[name].shape}"
            assert torch.equal(g[name].view(torch.uint8), w[name].view(torch.uint8)), f"{what}: {name} differs"
    assert [type(m).__name__ for m in got.modules()] == [type(m).__name__ for m in want.modules()], what
    for g, w in zip(got.modules(), want.modules()):  # the fused-shared MoE settings (fp8 runs them fused always)
        for attr in ("n_fused_shared", "fused_max_tokens"):
            assert getattr(g, attr, None) == getattr(w, attr, None), f"{what}: {type(g).__name__}.{attr}"
    ids = torch.tensor([[5, 17, 42, 99, 3, 200, 7, 64]])
    with torch.no_grad():
        assert torch.equal(got(ids), want(ids)), f"{what}: logits differ"


@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("load_format", ["auto", "dummy"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_quantize_while_loading_equals_after(checkpoints, variant, load_format, fuse):
    cfg, p = worker_cfg(checkpoints[variant], load_format), ParallelConfig()
    got, n_got = quantized_while_loading(cfg, p, torch.float32, fuse)
    want, n_want = quantized_after_load(cfg, p, torch.float32, fuse)
    assert n_got == n_want > 0
    assert any(isinstance(m, Fp8Linear) for m in got.modules())
    assert not any(t.is_meta for t in got.parameters()) and not any(t.is_meta for t in got.buffers())
    assert_same_model(got, want, f"{variant} {load_format} {'fused' if fuse else 'plain'}")


@pytest.mark.parametrize("fmt,shards", [("safetensors", 3), ("bin", 2)])
@pytest.mark.parametrize("variant", ["llama_gqa", "deepseek"])
def test_quantize_while_loading_sharded_files(tmp_path, variant, fmt, shards):
    """Tensors dealt round-robin over the shards (tiny_models.save_checkpoint): every layer is open until the last
    file, so layers complete in file order, not layer order; the result is still the quantize-after model."""
    path = make_checkpoint(variant, str(tmp_path), fmt=fmt, shards=shards)[1]
    cfg, p = worker_cfg(path, "auto"), ParallelConfig()
    got, _ = quantized_while_loading(cfg, p, torch.float32, True)
    want, _ = quantized_after_load(cfg, p, torch.float32, True)
    assert_same_model(got, want, f"{variant} {fmt} x{shards}")


def test_layers_allocated_on_first_tensor_and_finished_in_order(checkpoints, monkeypatch):
    """Dummy weights come in layer order: when layer i is finished, the layers after it are still on meta (never
    allocated), and the ones before it are already quantized."""
    import minke.parallel.sharded_loading as sl

    layers, events = [], []
    real = sl.LayerwiseParams
    monkeypatch.setattr(sl, "LayerwiseParams",
                        lambda model, *a: (layers.extend(model.model.layers), real(model, *a))[1])

    def on_layer(i, layer):
        events.append(i)
        assert layer is layers[i] and not any(t.is_meta for t in layer.parameters()), f"layer {i} unallocated"
        assert all(t.is_meta for later in layers[i + 1:] for t in later.parameters()), f"layer {i}: later allocated"
        for done in layers[:i]:  # MLP / MoE weights already fp8 (Fp8Linear buffers, Experts parameters)
            assert any(t.dtype == torch.float8_e4m3fn for t in done.mlp.state_dict().values()), f"{i}: not quantized"
        apply_quantization(layer, "fp8")

    sl.load_sharded_model(checkpoints["deepseek"], ParallelConfig(), torch.float32, "cpu", load_format="dummy",
                          on_layer=on_layer)
    assert events == [0, 1, 2]


def test_quantize_while_loading_reports_missing_tensor(tmp_path):
    """A layer whose tensor is missing is never finished; the load names the tensor, as without quantization."""
    from safetensors.torch import load_file, save_file

    from minke.loader import CheckpointError

    path = make_checkpoint("llama", str(tmp_path))[1]
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model.layers.1.mlp.up_proj.weight"):
        quantized_while_loading(worker_cfg(path, "auto"), ParallelConfig(), torch.float32, False)


# ----- memory: peak bytes of tensors alive -----

class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of CPU tensor storage alive while it is active. Every aten op's outputs are recorded by a weak
    handle on their storage (UntypedStorage._weak_ref: it expires when the storage itself is freed, whatever Python
    objects wrapped it, so a tensor re-wrapped as an nn.Parameter stays counted); after each op the live storages
    are summed once each. What it sees: everything allocated through torch ops (to_empty, normal_, copies,
    quantization temporaries, checkpoint slices materialized by indexing); what it may not see are buffers made
    outside the dispatcher (safetensors' own reads): they are the host-side staging of one tensor, not device
    memory on a GPU. No allocator hook is needed, so it runs on the CPU build of torch."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[int, int]] = {}  # data_ptr -> (weak handle, nbytes)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                ptr = st.data_ptr()
                old = self.storages.get(ptr)
                if old is None or torch.UntypedStorage._expired(old[0]):
                    self.storages[ptr] = (st._weak_ref(), st.nbytes())
        live = 0
        for ptr, (handle, nbytes) in list(self.storages.items()):
            if torch.UntypedStorage._expired(handle):
                torch.UntypedStorage._free_weak_ref(handle)
                del self.storages[ptr]
            else:
                live += nbytes
        self.peak = max(self.peak, live)
        return out


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage once (tied embeddings, fused views)."""
    st = {}
    for t in list(model.parameters()) + list(model.buffers()):
        st[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(st.values())


@pytest.mark.parametrize("load_format", ["auto", "dummy"])
@pytest.mark.parametrize("variant", ["llama", "deepseek"])
def test_peak_memory_quantized_while_loading(tmp_path, variant, load_format):
    """bf16 load of an 8-layer model: peak alive < fp8 model + 2 bf16 layers; the old pipeline (whole bf16 model,
    then quantize) goes above that bound, so the meter sees the difference it is meant to."""
    path = make_checkpoint(variant, str(tmp_path), num_hidden_layers=8)[1]
    cfg, p = worker_cfg(path, load_format), ParallelConfig()
    bf16 = load_unquantized(cfg, load_config(path), p, torch.bfloat16, torch.device("cpu"))
    layer_bytes = max(model_bytes(layer) for layer in bf16.model.layers)
    del bf16
    gc.collect()

    with LiveTensorBytes() as meter:
        model, _ = quantized_while_loading(cfg, p, torch.bfloat16, fuse=True)
    bound = model_bytes(model) + 2 * layer_bytes
    assert meter.peak < bound, f"peak {meter.peak} B >= fp8 model {model_bytes(model)} B + 2 bf16 layers"
    del model
    gc.collect()

    with LiveTensorBytes() as old:
        model, _ = quantized_after_load(cfg, p, torch.bfloat16, fuse=True)
    assert old.peak > bound, f"quantizing after the load peaked at {old.peak} B, under the bound {bound} B"


# ----- TP=2 over gloo -----

# (variant, load format, expert parallel): under EP a rank never reads the other rank's experts, yet their names
# still complete its layers.
TP_CASES = [("deepseek", "auto", False), ("deepseek", "dummy", True), ("llama_gqa", "dummy", False),
            ("deepseek_v2_lite", "auto", False), ("deepseek_v2_lite", "auto", True)]


def _rank_main(rank: int, world: int, init: str, cases) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    got = want = None
    try:
        for path, load_format, ep, fuse in cases:
            p, cfg = ParallelConfig(world, rank, ep), worker_cfg(path, load_format)
            got, _ = quantized_while_loading(cfg, p, torch.float32, fuse)
            want, _ = quantized_after_load(cfg, p, torch.float32, fuse)
            what = f"{os.path.basename(path)} {load_format} ep={ep} fuse={fuse} rank {rank}"
            for kind in ("named_parameters", "named_buffers"):  # each rank's shard, bit for bit
                g, w = dict(getattr(got, kind)()), dict(getattr(want, kind)())
                assert g.keys() == w.keys(), what
                for name in w:
                    assert g[name].dtype == w[name].dtype, f"{what}: {name}"
                    assert torch.equal(g[name].view(torch.uint8), w[name].view(torch.uint8)), f"{what}: {name}"
            ids = torch.tensor([[5, 17, 42, 99, 3, 200, 7, 64]])
            with torch.no_grad():
                assert torch.equal(got(ids), want(ids)), f"{what}: logits differ"
        dist.barrier()
    finally:
        got = want = None  # see test_parallel_multiproc.py: free tensors before gloo goes
        gc.collect()
        dist.destroy_process_group()


def test_quantize_while_loading_tp2(checkpoints, tmp_path):
    cases = [(checkpoints[v], fmt, ep, fuse) for v, fmt, ep in TP_CASES for fuse in (False, True)]
    mp.spawn(_rank_main, args=(2, "file://" + os.path.join(tmp_path, "rdv"), cases), nprocs=2, join=True)


def test_dense_quantization_in_row_blocks_equals_one_call(monkeypatch):
    """quantize_dense_fp8 quantizes a block of rows at a time (bounded temporaries): the same bits as one call,
    the last block shorter."""
    import minke.runner.quantization as q

    w = (torch.randn(1000, 300) * torch.logspace(-3, 2, 1000)[:, None]).bfloat16()
    w[7] = 0  # an all-zero row: scale 1
    want = q.quantize_fp8(w, w.float().abs().amax(dim=-1))
    monkeypatch.setattr(q, "_QUANT_BLOCK", 300 * 7 + 5)  # 7 rows a block: 143 blocks
    assert len(q._row_chunks(w)) == 143
    amax = torch.cat([w[rows].abs().amax(dim=-1).float() for rows in q._row_chunks(w)])
    got = q._quantize_rows_chunked(w, amax)
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])


# ----- GPU: DeepSeek LLM 67B's layer shape -----

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_llm67b_layers_peak_and_equality(tmp_path):
    """DeepSeek LLM 67B's shape (minke.benchmark SHAPES["llm-67b"]) cut to 3 layers, dummy weights, bf16, with the
    kernels' weight transforms: torch.cuda.max_memory_allocated during the load stays below the fp8 model + 2 bf16
    layers (at 95 layers that is ~70 GB: one H200), and the model equals quantizing after a whole bf16 load."""
    import json

    from minke.benchmark import SHAPES

    with open(tmp_path / "config.json", "w") as f:
        json.dump(dict(SHAPES["llm-67b"], num_hidden_layers=3), f)
    cfg, p, dev = worker_cfg(str(tmp_path), "dummy"), ParallelConfig(), torch.device("cuda")
    mc = load_config(str(tmp_path))
    with torch.device("meta"):
        from minke.models.model import DecoderLayer

        layer_bytes = sum(t.numel() * 2 for t in DecoderLayer(mc, 0).parameters())  # bf16
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got, _ = load_quantized(cfg, mc, p, torch.bfloat16, dev, fuse_weights=True)
    peak = torch.cuda.max_memory_allocated() - base
    fp8 = model_bytes(got)
    print(f"llm-67b x3 layers: peak {peak / 2**30:.2f} GiB, fp8 model {fp8 / 2**30:.2f} GiB, "
          f"bf16 layer {layer_bytes / 2**30:.2f} GiB")
    assert peak < fp8 + 2 * layer_bytes, f"peak {peak} B >= fp8 model {fp8} B + 2 bf16 layers ({layer_bytes} B)"
    want = load_unquantized(cfg, mc, p, torch.bfloat16, dev)
    transform_weights(want)
    apply_quantization(want, "fp8", p)
    g, w = dict(got.named_buffers()), dict(want.named_buffers())
    g.update(got.named_parameters())
    w.update(want.named_parameters())
    assert g.keys() == w.keys()
    for name in w:
        assert torch.equal(g[name].view(torch.uint8), w[name].view(torch.uint8)), name
