"""Where the GPU waits on the host: reads a torch.profiler chrome trace (profile_step.py --trace) and reports the
idle gaps between GPU work, and what the host was doing in them.

    python bench/trace_gaps.py prof/decode_b256.json [--min-gap-us 5] [--top 25]

A gap is an interval with no kernel, memcpy or memset on any GPU stream. For each gap the launch that ends it (the
CUDA runtime call whose correlation id the next GPU event carries) says whether the GPU waited on the host (the
launch came late) or on a dependency; the host events overlapping the gaps are summed by name (aten ops, CUDA runtime
calls and, where the trace was recorded with_stack, Python functions), so the step code the GPU waits for shows at
the top. Prints a plain-text report; no GPU needed."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATS = {"cpu_op", "cuda_runtime", "cuda_driver", "python_function", "user_annotation"}


def load(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def gaps(gpu: list[dict], min_gap: float) -> tuple[list[tuple[float, float, dict]], float, float, float]:
    """Idle intervals (start, end, the GPU event that ends it) of at least min_gap us, busy time, span start/end."""
    gpu = sorted(gpu, key=lambda e: e["ts"])
    out, busy = [], 0.0
    cur_start, cur_end = gpu[0]["ts"], gpu[0]["ts"] + gpu[0]["dur"]
    for e in gpu[1:]:
        s, d = e["ts"], e["dur"]
        if s > cur_end:
            busy += cur_end - cur_start
            if s - cur_end >= min_gap:
                out.append((cur_end, s, e))
            cur_start, cur_end = s, s + d
        else:
            cur_end = max(cur_end, s + d)
    busy += cur_end - cur_start
    return out, busy, gpu[0]["ts"], cur_end


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def report(events: list[dict], min_gap: float, top: int) -> str:
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    host = [e for e in events if e.get("cat") in HOST_CATS]
    if not gpu:
        return "no GPU events in the trace"
    idle, busy, t0, t1 = gaps(gpu, min_gap)
    launch_by_corr = {e["args"]["correlation"]: e for e in host
                      if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    lines = [f"span {(t1 - t0) / 1000:.3f} ms, GPU busy {busy / 1000:.3f} ms ({100 * busy / (t1 - t0):.1f}%), "
             f"{len(idle)} gaps >= {min_gap:g} us totalling {sum(b - a for a, b, _ in idle) / 1000:.3f} ms"]
    # Gaps the host caused: the next GPU event was launched after the GPU had gone idle.
    late = 0.0
    by_name: dict[str, float] = defaultdict(float)
    host = sorted(host, key=lambda e: e["ts"])
    for a, b, nxt in idle:
        corr = nxt.get("args", {}).get("correlation")
        launch = launch_by_corr.get(corr)
        if launch is not None and launch["ts"] > a:
            late += min(b, launch["ts"] + launch["dur"]) - a
        for h in host:
            if h["ts"] > b:
                break
            o = overlap(a, b, h["ts"], h["ts"] + h["dur"])
            if o > 0:
                by_name[f'[{h["cat"]}] {h["name"][:110]}'] += o
    lines.append(f"of which the next GPU event was launched after the GPU went idle: {late / 1000:.3f} ms")
    lines.append("\nlargest gaps (us): start offset, length, the GPU event that ends it, its launch's offset")
    for a, b, nxt in sorted(idle, key=lambda g: g[0] - g[1])[:top]:
        launch = launch_by_corr.get(nxt.get("args", {}).get("correlation"))
        lt = f'{launch["name"]} at {(launch["ts"] - t0):.0f}' if launch else "?"
        lines.append(f"  {a - t0:10.0f} {b - a:8.1f}  {nxt['name'][:60]}  <- {lt}")
    lines.append("\nhost events overlapping the gaps, summed (us; nested events each count)")
    for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {us:10.1f}  {name}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--min-gap-us", type=float, default=5.0)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    print(report(load(args.trace), args.min_gap_us, args.top))


if __name__ == "__main__":
    main()
