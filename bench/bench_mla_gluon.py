"""The pipelined Gluon MLA decode (kernels/mla_decode_gluon.py) against the Triton kernel at its model launch
(kernels/mla_decode.py, impl="new"), side by side in one run, CUDA-graph replays over caches > 4x the L2 (as
bench/bench_mla_decode.py times them). For each (batch, context): the Triton kernel's time, then the Gluon kernel
over a grid of split counts x tiles x warps x ring stages, each checked against the reference (small cases) or
against the Triton kernel's output, and the best.

    python bench/bench_mla_gluon.py --batches 1,16,64 --contexts 8192,32768,61440
    python bench/bench_mla_gluon.py --batches 1 --contexts 61440 --quick     # a few launches only
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from bench_mla_decode import L2_BYTES, _time, make_inputs  # noqa: E402
from minke.kernels import latent_cache  # noqa: E402
from minke.kernels.mla_decode import choose_launch, mla_decode, mla_decode_ref, num_sms  # noqa: E402
from minke.kernels.mla_decode_gluon import SMEM_LIMIT, mla_decode_gluon, smem_bytes  # noqa: E402


def gluon_grid(B: int, heads: int, context: int, sms: int, quick: bool) -> list[dict]:
    """Launches to try at the kernel's tiles (32 tokens, 4 warps, 2 stages, K chunks of 128; the 2026-12-04 sweep's
    best nearly everywhere): the split counts that fill the SMs' two resident programs k = 1-4 times over (exactly,
    and the counts on either side), and the launch model's own; with --quick only the model's, and then also the
    64-token tiles and the 3-stage ring at that count."""
    programs = B * -(-heads // 16)
    model = choose_launch(B, heads, context, sms, gluon=True).num_kv_splits
    cap = max(1, min(512, -(-context // 64)))
    splits = {model}
    if not quick:
        for k in (1, 2, 3, 4):
            exact = k * 2 * sms / programs
            splits |= {max(1, min(cap, int(exact))), max(1, min(cap, -(-int(exact * 1000) // 1000)))}
    base = dict(block_n=32, num_warps=4, stages=2, k_chunk=128)
    out = [dict(base, num_kv_splits=s) for s in sorted(splits)]
    if quick:
        out += [dict(base, num_kv_splits=model, block_n=64), dict(base, num_kv_splits=model, stages=3)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--contexts", default="8192,32768,61440")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda")
    C, R, dt = 512, 64, torch.bfloat16
    sms = num_sms(device)
    row = latent_cache.bytes_per_token(C + R, dt)
    print(f"device {torch.cuda.get_device_name(device)}, {sms} SMs; heads {args.heads}, latent {C}+{R} bf16", flush=True)
    for context, B in itertools.product((int(c) for c in args.contexts.split(",")),
                                        (int(b) for b in args.batches.split(","))):
        kv_bytes = B * context * row
        copies = max(1, min(10, -(-4 * L2_BYTES // kv_bytes)))
        sets, lens, q, pe = make_inputs(B, context, args.heads, C, R, dt, device, copies)
        scale = 192 ** -0.5

        def run(**kw):
            return [lambda c=c, t=t: mla_decode(q, pe, c, t, lens, scale, **kw) for c, t in sets]

        if B * context <= 65536:
            want = mla_decode_ref(q, pe, sets[0][0], sets[0][1], lens, scale).float()
        else:
            want = run(impl="new")[0]().float()
        t_triton = _time(run(impl="new"), device)
        launch = choose_launch(B, args.heads, context, sms)
        print(f"B={B} ctx={context} ({kv_bytes / 2**20:.1f} MiB): triton {t_triton * 1000:.1f} us "
              f"{kv_bytes / t_triton / 1e9:.2f} TB/s (splits={launch.num_kv_splits} block_n={launch.block_n} "
              f"warps={launch.num_warps})", flush=True)
        timed = []
        def run_gluon(**kw):
            return [lambda c=c, t=t: mla_decode_gluon(q, pe, c, t, lens, scale, **kw) for c, t in sets]

        for cfg in gluon_grid(B, args.heads, context, sms, args.quick):
            try:
                err = (run_gluon(**cfg)[0]().float() - want).abs().max().item()
                if not err < 5e-2:
                    print(f"    WRONG RESULT (max err {err:.3g}) {cfg}", flush=True)
                    continue
                ms = _time(run_gluon(**cfg), device)
            except Exception as e:  # noqa: BLE001  (out of resources for this launch)
                print(f"    skip {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                continue
            timed.append((ms, cfg))
            print(f"    gluon {ms * 1000:8.1f} us {kv_bytes / ms / 1e9:5.2f} TB/s  {cfg}", flush=True)
        if timed:
            ms, cfg = min(timed, key=lambda r: r[0])
            print(f"  best gluon B={B} ctx={context}: {ms * 1000:.1f} us {kv_bytes / ms / 1e9:.2f} TB/s "
                  f"(x{t_triton / ms:.2f} the Triton kernel) {cfg}", flush=True)
            model = choose_launch(B, args.heads, context, sms, gluon=True)
            mine = next((t for t, c in timed if c["num_kv_splits"] == model.num_kv_splits and c["block_n"] == 32
                         and c["stages"] == 2), None)
            if mine is not None:
                print(f"  model gluon B={B} ctx={context}: {mine * 1000:.1f} us {kv_bytes / mine / 1e9:.2f} TB/s "
                      f"splits={model.num_kv_splits} (x{mine / ms:.2f} the best's time)", flush=True)
        del sets
    return 0


if __name__ == "__main__":
    sys.exit(main())
