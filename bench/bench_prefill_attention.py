"""Prefill attention of one step on the GPU, MLA shapes of DeepSeek-V2-Lite (16 heads, q/k 192, v 128): the
FlashAttention-2 varlen call the engine makes for bf16 (v padded to 192), the Triton varlen kernel
(kernels/prefill_attention.py) in bf16 and fp32, and the per-chunk SDPA loop that fp32 ran before it.

    python bench/bench_prefill_attention.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minke.kernels.prefill_attention import varlen_attention  # noqa: E402
from minke.models.attention import PrefillPack, varlen_causal_attention  # noqa: E402


def timed(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    dev, h = torch.device("cuda"), 16
    cases = {"one 2048-token prompt": ([2048], [2048]), "8 prompts of 256": ([256] * 8, [256] * 8),
             "a 512-token chunk after 1536 cached": ([512], [2048])}
    for name, (q_lens, k_lens) in cases.items():
        cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
        pack = PrefillPack(0, cu(q_lens), cu(k_lens), q_lens, k_lens, None)
        flops = sum(4 * h * ql * (kl - ql / 2) * 160 for ql, kl in zip(q_lens, k_lens))  # ~causal half, (192+128)/2
        row = []
        for dt in (torch.bfloat16, torch.float32):
            q = torch.randn(sum(q_lens), h, 192, device=dev, dtype=dt)
            k = torch.randn(sum(k_lens), h, 192, device=dev, dtype=dt)
            v = torch.randn(sum(k_lens), h, 128, device=dev, dtype=dt)
            tri = timed(lambda: varlen_attention(q, k, v, pack.cu_q, pack.cu_k, pack.max_q, 0.07))
            ref = timed(lambda: varlen_causal_attention(q, k, v, pack, 0.07))  # flash (bf16) or the SDPA loop (fp32)
            torch.testing.assert_close(varlen_attention(q, k, v, pack.cu_q, pack.cu_k, pack.max_q, 0.07).float(),
                                       varlen_causal_attention(q, k, v, pack, 0.07).float(), rtol=3e-2, atol=3e-2)
            what = "flash varlen" if dt == torch.bfloat16 else "SDPA loop"
            row.append(f"{str(dt)[6:]}: triton {tri * 1000:7.1f} us ({flops / tri / 1e9:5.0f} TFLOP/s), "
                       f"{what} {ref * 1000:7.1f} us")
        print(f"{name:38s} " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
