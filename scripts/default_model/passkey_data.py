"""Training text that teaches a small model to retrieve from its context (for bench/kv_fp8_accuracy.py's retrieval
rows, which say nothing on a model that cannot retrieve with a full-precision cache either).

Two kinds of {"text"} documents, mixed:
- a planted passkey in story filler, in kv_fp8_accuracy.py's words: filler, " The pass key is K. Remember it. K is the
  pass key.", more filler, " What is the pass key? The pass key is K." (K five digits; the key's position varies);
- an induction copy: a run of random tokens of the tokenizer, then the same run again.
The filler comes from the default model's *training* story stream (simple_stories.py's stories.jsonl), never from the
held-out stream the benchmark reads.

    python scripts/default_model/simple_stories.py --out_dir build/pk/st --num_stories 6000 --num_requests 0
    python scripts/default_model/passkey_data.py --stories build/pk/st/stories.jsonl --out build/pk/train.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from minke.tokenizer import load_tokenizer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stories", required=True, help="stories.jsonl of simple_stories.py (the training stream)")
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "minke/assets/default_model"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--passkey_docs", type=int, default=6000)
    ap.add_argument("--copy_docs", type=int, default=3000)
    ap.add_argument("--max_tokens", type=int, default=500, help="tokens a document at most (one training block)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tok = load_tokenizer(args.tokenizer)
    with open(args.stories, encoding="utf-8") as f:
        stories = [json.loads(line)["text"] for line in f if line.strip()]
    docs = []
    for _ in range(args.passkey_docs):
        key = str(rng.randrange(10000, 100000))
        needle = f" The pass key is {key}. Remember it. {key} is the pass key."
        tail = f" What is the pass key? The pass key is {key}."
        budget = args.max_tokens - len(tok.encode(needle + tail)) - 4
        filler = tok.encode(" ".join(rng.sample(stories, 8)))[: rng.randrange(budget // 4, budget)]
        at = rng.randrange(0, len(filler) + 1)
        docs.append(tok.decode(filler[:at]) + needle + tok.decode(filler[at:]) + tail)
    vocab = tok.vocab_size if hasattr(tok, "vocab_size") else 4096
    for _ in range(args.copy_docs):
        ids = [rng.randrange(2, vocab) for _ in range(rng.randrange(20, args.max_tokens // 2 - 10))]
        run = tok.decode(ids)
        docs.append(run + run)
    rng.shuffle(docs)
    with open(args.out, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    print(f"{len(docs)} documents -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
