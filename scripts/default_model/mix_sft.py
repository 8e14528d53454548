"""Fine-tuning set of the default model: the ChatterBot small-talk pairs of prepare_data.py's sft.jsonl (short
replies; its Austen-paragraph answers are left out) + the synthetic story requests of simple_stories.py + "continue
the story" pairs cut from synthetic stories (+ with --small_talk N, N generated small-talk pairs of small_talk.py).

    python scripts/default_model/mix_sft.py --base build/default_model/data/sft.jsonl \
        --stories build/default_model/stories --out build/default_model/stories/sft.jsonl
    # the small-talk pass: 8000 small-talk pairs + a replay of half the story requests, 500 continuations and the
    # ChatterBot pairs once (so the stories are not forgotten)
    python scripts/default_model/mix_sft.py --base build/default_model/data/sft.jsonl \
        --stories build/default_model/stories --out build/default_model/stories/sft_smalltalk.jsonl \
        --small_talk 8000 --story_requests 2000 --continue_examples 500 --chat_repeats 1

Counts go to <out stem>_stats.json beside --out (sft_stats.json for sft.jsonl), which package_model.py reads.
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


# ChatterBot answers about the bot itself ("Who are you?" -> "Who? Who is but a form following the function of
# what", "What are you?" -> "I am but a man in a mask.") contradict the small-talk identity answers: with
# --small_talk they are left out, as is every ChatterBot pair whose prompt the small-talk generator also asks.
SELF_QUESTION = re.compile(r"\b(who|what) are you\b|\byour name\b|\bare you (a|an|human|alive)\b", re.I)


def load_small_talk(name: str = "small_talk"):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--stories", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--continue_examples", type=int, default=1000)
    ap.add_argument("--story_requests", type=int, default=None,
                    help="use this many of the story requests (default: all); a replay in the small-talk pass")
    ap.add_argument("--chat_repeats", type=int, default=2, help="times each ChatterBot pair is seen")
    ap.add_argument("--small_talk", type=int, default=0, help="add N generated small-talk pairs (small_talk.py)")
    ap.add_argument("--small_talk_module", default="small_talk",
                    help="generator module beside this file: small_talk (current) or small_talk_round1 (the "
                         "templates of the first four small-talk passes, kept so a rebuild makes the same data)")
    ap.add_argument("--chat_sample", type=int, default=None,
                    help="use this many of the (kept) ChatterBot pairs (default: all), each chat_repeats times")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    chat = [r for r in map(json.loads, open(a.base)) if is_chat_pair(r)]
    chat = list({(r["instruction"], r["output"]): r for r in chat}.values())
    small = []
    dropped = 0
    if a.small_talk:
        st = load_small_talk(a.small_talk_module)
        small = [{"instruction": r["instruction"], "output": r["output"]} for r in st.generate(a.small_talk, a.seed)]
        asked = {st.normalize(r["instruction"]) for r in small}
        kept = [r for r in chat if st.normalize(r["instruction"]) not in asked and not SELF_QUESTION.search(
            r["instruction"])]
        dropped, chat = len(chat) - len(kept), kept
    if a.chat_sample is not None:
        chat = rng.sample(chat, min(a.chat_sample, len(chat)))
    requests = [json.loads(l) for l in open(a.stories / "story_requests.jsonl")]
    if a.story_requests is not None:
        requests = rng.sample(requests, a.story_requests)
    stories = [json.loads(l)["text"] for l in open(a.stories / "stories.jsonl")]
    cont = []
    for text in rng.sample(stories, a.continue_examples):
        sents = re.split(r"(?<=[.!?\"])\s+", text)
        k = rng.randint(1, max(1, len(sents) // 2))
        cont.append({"instruction": rng.choice(CONTINUE).format(s=" ".join(sents[:k])), "output": " ".join(sents[k:])})
    rows = chat * a.chat_repeats + requests + cont + small
    rng.shuffle(rows)
    with open(a.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    stats = {"chatterbot_pairs": len(chat), "chatterbot_repeats": a.chat_repeats, "story_requests": len(requests),
             "continue_examples": len(cont), "sft_examples": len(rows)}
    if a.small_talk or "smalltalk" in a.out.stem:
        stats.update(small_talk=len(small), chatterbot_dropped=dropped)
    (a.out.parent / f"{a.out.stem}_stats.json").write_text(json.dumps(stats, indent=2))
    print(f"{len(chat)} chat pairs (x{a.chat_repeats}), {len(requests)} story requests, {len(cont)} continuations, "
          f"{len(small)} small-talk pairs ({dropped} ChatterBot pairs dropped) -> {a.out}")


if __name__ == "__main__":
    main()
