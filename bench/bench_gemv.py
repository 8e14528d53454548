"""One-row GEMMs (batch-1 decode projections) on the GPU: cuBLAS (F.linear) against the matrix-vector Triton
kernel of kernels/gemv.py over its block sizes (and at the config gemv_config picks), in CUDA-graph replays.

    python bench/bench_gemv.py            # the DeepSeek-V2-Lite projections
"""

from __future__ import annotations

import itertools
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]

from tune_fused_moe import time_graph  # noqa: E402
from minke.kernels.gemv import gemv, gemv_config  # noqa: E402

SHAPES = {  # name: (N out, K in)
    "q_proj+kv_a (fused)": (3072 + 576, 2048),
    "o_proj": (2048, 2048),
    "dense gate_up (layer 0)": (2 * 10944, 2048),
    "dense down (layer 0)": (2048, 10944),
}


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
        x = torch.randn(1, k, device=dev, dtype=dt)
        ref_ms = time_graph(lambda: F.linear(x, w))
        picked_ms = time_graph(lambda: gemv(x, w))
        best, best_ms = None, float("inf")
        for bn, bk, warps, st in itertools.product((4, 8, 16, 32), (128, 256, 512), (4, 8), (1, 2, 3)):
            cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": st}
            try:
                ms = time_graph(lambda: gemv(x, w, cfg))
            except Exception:
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        torch.testing.assert_close(gemv(x, w).float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2)
        gb = n * k * 2 / 1e9
        print(f"{name:26s} [{n} x {k}]: cuBLAS {ref_ms * 1000:6.1f} us ({gb / ref_ms * 1000:5.0f} GB/s), "
              f"gemv {best_ms * 1000:6.1f} us ({gb / best_ms * 1000:5.0f} GB/s) {best}; at gemv_config "
              f"{gemv_config(n, k)}: {picked_ms * 1000:6.1f} us", flush=True)


if __name__ == "__main__":
    main()
