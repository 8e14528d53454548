"""What `--kv-cache-dtype fp8` (the cache in fp8: MLA's latent with a scale per token, MHA / GQA K and V with a
scale per token and KV head) does to a trained model's
predictions, against the same model with a cache in the model dtype: per-token logit error, KL, cross-entropy and
top-1 agreement teacher-forced, greedy agreement free-running, and retrieval over the context (an induction copy of
a random token sequence, and a planted passkey).

Runs through the paged engine path on the CPU with the torch attention backend (the math the GPU kernels implement:
tests/test_kernel_mla_decode.py, test_kernel_mla_prologue.py, test_kernel_paged_attention.py and
test_kernel_mha_prologue.py check them against it): prompts are prefilled in
chunks, so later chunks read their prefix back from the (fp8) cache, and generation decodes one token a step over it.

    python bench/kv_fp8_accuracy.py                       # the embedded default model, its held-out story stream
    python bench/kv_fp8_accuracy.py --model DIR --valid held_out.jsonl --device cuda   # any checkpoint minke loads

Random-weight models say nothing here: use trained weights.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minke import load_model, load_tokenizer  # noqa: E402
from minke.default_model import default_model_dir  # noqa: E402
from minke.kernels.latent_cache import KV_CACHE_DTYPES  # noqa: E402
from minke.models.attention import TorchAttentionBackend  # noqa: E402
from minke.runner.input_batch import SeqChunk, make_forward_batch  # noqa: E402
from minke.runner.kv_cache import allocate_kv_caches  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BLOCK = 16


class PagedRun:
    """One sequence through the paged path over a cache of one dtype (blocks in shuffled order)."""

    def __init__(self, model, kv_dtype: torch.dtype, max_len: int, device):
        self.model, self.device = model, device
        nb = -(-max_len // BLOCK) + 1
        self.caches = allocate_kv_caches(model.config, nb, BLOCK, kv_dtype, device)
        self.table = torch.randperm(nb, generator=torch.Generator().manual_seed(0)).tolist()
        self.backend = TorchAttentionBackend()

    @torch.no_grad()
    def step(self, tokens: list[int], start: int) -> torch.Tensor:
        """tokens at positions start.. -> their logits [len, vocab] fp32 (the cache then holds them too)."""
        ids, batch = make_forward_batch([SeqChunk(tokens, start, self.table)], self.caches, BLOCK, self.device,
                                        self.backend)
        batch.logits_indices = None  # every row
        return self.model(ids, batch=batch).reshape(len(tokens), -1).float()

    def teacher_forced(self, doc: list[int], chunk: int) -> torch.Tensor:
        """Logits of every position of doc [len, vocab], prefilled `chunk` tokens a step."""
        return torch.cat([self.step(doc[s:s + chunk], s) for s in range(0, len(doc), chunk)])

    def greedy(self, prompt: list[int], n: int, chunk: int) -> list[int]:
        logits = self.teacher_forced(prompt, chunk)[-1]
        out = []
        for i in range(n):
            out.append(int(logits.argmax()))
            if i + 1 < n:
                logits = self.step([out[-1]], len(prompt) + i)[0]
        return out


def held_out_docs(tok, valid: str | None, block: int) -> list[list[int]]:
    if valid is None:  # the default model's held-out story stream, regenerated (as bench/fp8_accuracy.py does)
        tmp = tempfile.mkdtemp()
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "default_model", "simple_stories.py"),
                        "--out_dir", tmp, "--num_stories", "0", "--num_requests", "0"], check=True,
                       stdout=subprocess.DEVNULL)
        valid = os.path.join(tmp, "stories_valid.jsonl")
    with open(valid, encoding="utf-8") as f:
        docs = [tok.encode(json.loads(line)["text"])[:block] for line in f if line.strip()]
    return [d for d in docs if len(d) >= 8]


def compare_logits(ref: torch.Tensor, got: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-token error of got [T, V] against ref [T, V]; cross-entropies on targets [T]."""
    d = (got - ref).abs()
    scale = ref.std(-1).mean()
    lr, lg = F.log_softmax(ref, -1), F.log_softmax(got, -1)
    return {"mean_abs_logit_err": d.mean().item(), "max_abs_logit_err": d.max().item(),
            "max_err_per_logit_std": (d.max() / scale).item(),
            "kl_ref_to_fp8": (lr.exp() * (lr - lg)).sum(-1).mean().item(),
            "top1_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
            "ce_ref": F.cross_entropy(ref, targets).item(), "ce": F.cross_entropy(got, targets).item()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a checkpoint of any family (default: the embedded default model)")
    ap.add_argument("--valid", default=None, help='held-out {"text": ...} jsonl (default: the default model\'s '
                                                  "held-out story stream, regenerated)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="model and reference cache (default: bfloat16 on CUDA, float32 on CPU, where bf16 is slow)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--docs", type=int, default=40, help="held-out documents, teacher-forced")
    ap.add_argument("--block", type=int, default=512, help="tokens per document at most")
    ap.add_argument("--chunk", type=int, default=64, help="prefill chunk: later chunks read the cached prefix")
    ap.add_argument("--prompts", type=int, default=40, help="greedy agreement: this many documents' starts")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--copy-len", type=int, default=200, help="induction copy: random tokens, seen once, repeated")
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--passkeys", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    path = args.model or default_model_dir()
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    model = load_model(path, dtype=dtype, device=device).eval()
    tok = load_tokenizer(path)
    max_len = model.config.max_position_embeddings
    block = min(args.block, max_len)
    docs = held_out_docs(tok, args.valid, block)
    variants = {"fp8_e4m3": KV_CACHE_DTYPES["fp8_e4m3"], "fp8_e5m2": KV_CACHE_DTYPES["fp8_e5m2"]}
    res: dict = {"model": path, "dtype": args.dtype, "device": str(device), "docs": min(args.docs, len(docs)),
                 "chunk": args.chunk}
    print(f"model {path} ({args.dtype}), reference cache {args.dtype}", flush=True)

    # 1. teacher-forced logits on held-out documents
    ref_rows, rows = [], {k: [] for k in variants}
    targets = []
    for doc in docs[: args.docs]:
        ref_rows.append(PagedRun(model, dtype, len(doc), device).teacher_forced(doc, args.chunk)[:-1])
        targets.append(torch.tensor(doc[1:], device=device))
        for k, kv in variants.items():
            rows[k].append(PagedRun(model, kv, len(doc), device).teacher_forced(doc, args.chunk)[:-1])
    ref, tgt = torch.cat(ref_rows), torch.cat(targets)
    for k in variants:
        m = compare_logits(ref, torch.cat(rows[k]), tgt)
        res[f"{k}_teacher_forced"] = {n: round(v, 6) for n, v in m.items()}
        print(f"{k}: {ref.shape[0]} tokens teacher-forced: logit err mean {m['mean_abs_logit_err']:.4f} max "
              f"{m['max_abs_logit_err']:.4f} ({m['max_err_per_logit_std']:.3f} logit std), KL {m['kl_ref_to_fp8']:.2e}, "
              f"top-1 agreement {m['top1_agreement']:.2%}, cross-entropy {m['ce']:.4f} vs {m['ce_ref']:.4f}",
              flush=True)

    # 2. greedy agreement, free-running
    prompts = [d[: args.prompt_len] for d in docs if len(d) > args.prompt_len][: args.prompts]
    n = min(args.new_tokens, max_len - args.prompt_len)
    ref_out = [PagedRun(model, dtype, args.prompt_len + n, device).greedy(p, n, args.chunk) for p in prompts]
    for k, kv in variants.items():
        outs = [PagedRun(model, kv, args.prompt_len + n, device).greedy(p, n, args.chunk) for p in prompts]
        same = sum(a == b for a, b in zip(ref_out, outs)) / len(prompts)
        prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), n) for a, b in zip(ref_out, outs))
        prefix /= len(prompts) * n
        res[f"{k}_greedy"] = {"prompts": len(prompts), "new_tokens": n, "identical": round(same, 3),
                              "mean_prefix": round(prefix, 3)}
        print(f"{k}: greedy {len(prompts)} prompts x {n} tokens: {same:.0%} identical, {prefix:.0%} of the tokens "
              f"before the first difference on average", flush=True)

    # 3. retrieval over the context: induction copy of random tokens (the second copy is predictable only by
    #    attending back to the first), and a planted passkey
    rng = random.Random(0)
    L = min(args.copy_len, (max_len - 1) // 2)
    vocab = model.config.vocab_size
    seqs = [[rng.randrange(2, vocab) for _ in range(L)] for _ in range(args.copies)]
    for name, kv in [("reference", dtype), *variants.items()]:
        hits = total = 0
        for s in seqs:
            logits = PagedRun(model, kv, 2 * L, device).teacher_forced(s + s, args.chunk)
            pred = logits[L:2 * L - 1].argmax(-1).tolist()  # predictions of s[1:] from the second copy
            hits += sum(p == t for p, t in zip(pred, s[1:]))
            total += L - 1
        res[f"copy_accuracy_{name}"] = round(hits / total, 4)
        print(f"{name}: induction copy over {L} tokens: {hits / total:.2%} of the second copy predicted", flush=True)
    filler = tok.encode(" ".join(tok.decode(d) for d in docs[: 50]))
    keys = [str(rng.randrange(10000, 100000)) for _ in range(args.passkeys)]  # the same keys for every cache
    for name, kv in [("reference", dtype), *variants.items()]:
        found = 0
        for i, key in enumerate(keys):
            needle = tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
            question = tok.encode(" What is the pass key? The pass key is")
            room = max_len - len(needle) - len(question) - 8
            at = (i * 37) % max(1, room // 2)
            ids = filler[:at] + needle + filler[at: room // 2 + at] + question
            ans = tok.decode(PagedRun(model, kv, len(ids) + 8, device).greedy(ids, 6, args.chunk))
            found += key in ans.replace(" ", "")
        res[f"passkey_{name}"] = f"{found}/{args.passkeys}"
        print(f"{name}: passkey retrieved {found}/{args.passkeys} (contexts up to {max_len} tokens)", flush=True)
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
