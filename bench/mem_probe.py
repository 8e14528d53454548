"""Where the memory of a long paged prefill goes (the forward the engine runs to size the KV cache): peak memory
allocated above the step's start inside each module call, largest first. GPU only.

    python bench/mem_probe.py --shape v2-lite --tokens 8192
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minke.benchmark import shape_dir  # noqa: E402
from minke.runner.input_batch import SeqChunk, make_forward_batch  # noqa: E402
from minke.runner.kv_cache import allocate_kv_caches  # noqa: E402
from minke.engine.llm import LLM  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="v2-lite")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=4, help="layers to build (memory per layer call does not change)")
    args = ap.parse_args()
    llm = LLM(shape_dir(args.shape, None, args.layers), load_format="dummy", dtype="bfloat16", max_model_len=args.tokens,
              kv_cache_tokens=args.tokens, enforce_eager=True)
    worker = llm.llm_engine.runner.executor.worker
    model, dev, bs = worker.model, worker.device, worker.block_size
    peaks: dict[str, float] = defaultdict(float)
    starts: dict[str, int] = {}

    def pre(name):
        def hook(mod, inp):
            torch.cuda.synchronize()
            starts[name] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return hook

    def post(name):
        def hook(mod, inp, out):
            torch.cuda.synchronize()
            key = type(mod).__name__ + ":" + name.split(".")[-1]
            peaks[key] = max(peaks[key], (torch.cuda.max_memory_allocated() - starts[name]) / 2**20)
        return hook

    import re

    # Siblings only (each layer's attention, MLP/MoE and norms; embedding, final norm, head): peak stats are reset
    # at each call, so nested modules would spoil their parents' numbers.
    for name, m in model.named_modules():
        if re.fullmatch(r"model\.layers\.\d+\.[a-z_]+|model\.embed_tokens|model\.norm|lm_head", name):
            m.register_forward_pre_hook(pre(name))
            m.register_forward_hook(post(name))
    n = args.tokens
    caches = allocate_kv_caches(model.config, 2, bs, worker.dtype, dev)
    ids, batch = make_forward_batch([SeqChunk([0] * n, 0, [0] * ((n + bs - 1) // bs))], caches, bs, dev, worker.backend)
    batch.slot_mapping.zero_()
    torch.cuda.synchronize()
    with torch.inference_mode():
        model(ids, batch=batch)
    torch.cuda.synchronize()
    print(f"{n}-token paged prefill, peak memory above each call's start:")
    for k, v in sorted(peaks.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {v:9.1f} MiB  {k}")
    free, total = torch.cuda.mem_get_info()
    print(f"reserved {torch.cuda.memory_reserved() / 2**30:.2f} GiB, allocated {torch.cuda.memory_allocated() / 2**30:.2f}"
          f" GiB, device used {(total - free) / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
