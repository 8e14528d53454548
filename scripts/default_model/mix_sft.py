"""Fine-tuning set of the default model: the ChatterBot small-talk pairs of prepare_data.py's sft.jsonl (short
replies; its Austen-paragraph answers are left out) + the synthetic story requests of simple_stories.py + "continue
the story" pairs cut from synthetic stories.

    python scripts/default_model/mix_sft.py --base build/default_model/data/sft.jsonl \
        --stories build/default_model/stories --out build/default_model/stories/sft.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

CONTINUE = ("Continue the story: {s}", "Please continue this story: {s}", "What happens next? {s}",
            "Finish this story: {s}")


def is_chat_pair(row: dict) -> bool:
    ins, out = row["instruction"], row["output"]
    storyish = re.search(r"\bstor(y|ies)\b|^Tell me about|^Write a few sentences|^Continue|^Finish|^What happens next",
                         ins, re.I)
    return not storyish and len(out.split()) <= 40


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--stories", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--continue_examples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    chat = [r for r in map(json.loads, open(a.base)) if is_chat_pair(r)]
    chat = list({(r["instruction"], r["output"]): r for r in chat}.values())
    requests = [json.loads(l) for l in open(a.stories / "story_requests.jsonl")]
    stories = [json.loads(l)["text"] for l in open(a.stories / "stories.jsonl")]
    cont = []
    for text in rng.sample(stories, a.continue_examples):
        sents = re.split(r"(?<=[.!?\"])\s+", text)
        k = rng.randint(1, max(1, len(sents) // 2))
        cont.append({"instruction": rng.choice(CONTINUE).format(s=" ".join(sents[:k])), "output": " ".join(sents[k:])})
    rows = chat * 2 + requests + cont
    rng.shuffle(rows)
    with open(a.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    stats = {"chatterbot_pairs": len(chat), "chatterbot_repeats": 2, "story_requests": len(requests),
             "continue_examples": len(cont), "sft_examples": len(rows)}
    (a.out.parent / "sft_stats.json").write_text(json.dumps(stats, indent=2))
    print(f"{len(chat)} chat pairs (x2), {len(requests)} story requests, {len(cont)} continuations -> {a.out}")


if __name__ == "__main__":
    main()
