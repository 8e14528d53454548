"""Three-turn conversations for the default model (issue 24, part 2 item 6: it lost the topic after 2-3 turns,
"Hello! How are you today?" -> ... -> a story about Emma), from templates in the style of small_talk.py (own text,
Apache-2.0; no outside corpus), and the held-out eval that scores the third answer.

Each conversation has a topic X (an animal or thing of small_talk.ABOUT). X is named once, in the first or second
user turn; the third user turn refers back to it only by a pronoun ("Do you like them?", "Tell me more about them.",
"Can you tell me a story about one?", "What was the story about?"), so the third answer can name X only if the
model reads the earlier turns. Between them may sit an unrelated small-talk turn (a greeting, the model's name, a
fact). Answers are the small-talk generator's own (greetings, "Yes, I like cats. ...", the "about" texts) and,
for story follow-ups, a story of simple_stories.py's grammar about X.

    python scripts/default_model/multi_turn.py --num 3000 --out build/default_model/stories/multi_turn.jsonl
    python scripts/default_model/multi_turn.py --eval minke/assets/default_model     # held-out eval, greedy

Rows are {"messages": [...]} (minke finetune: loss on every assistant turn). The eval's conversations
(multi_turn_eval.json beside this file) use user turns the templates never produce (checked at generation); the
model answers every turn itself (greedy, its own earlier answers in the history), and a conversation counts when
the third answer names the topic (singular or plural, whole word).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
EVAL_FILE = HERE / "multi_turn_eval.json"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


st = _load("small_talk")
stories = _load("simple_stories")

TOPICS = {s: (p, text) for (s, p), text in st.ABOUT.items() if not p.startswith("the ") and s != p}
STORY_TOPICS = [s for s in TOPICS if s in stories.TOPICS]

# third user turns, by what they ask; {o}: "one" / "it" (singular reference)
LIKE_FOLLOW = ["Do you like them?", "Do you like them too?", "And do you like them?", "Do you love them?",
               "Are they nice?"]
MORE_FOLLOW = ["Tell me more about them.", "What else do you know about them?", "Can you tell me more about them?",
               "What are they like?", "Say more about them, please.", "Why do you like them?"]
STORY_FOLLOW = ["Can you tell me a story about one?", "Tell me a story about one of them.",
                "Now tell me a story about one.", "Please tell me a story about them.",
                "I want a story about one of them."]
WHAT_STORY = ["What was the story about?", "Who was that story about?", "What was your story about?"]
THANKS_MID = [("Thank you!", "You are welcome! Would you like to know more?"),
              ("That is nice.", "I am glad you like it."), ("Thanks, Minke.", "You are welcome!"),
              ("Wow, I did not know that.", "Now you know! Would you like to hear more?"),
              ("Cool!", "I think so too.")]
LIKE_Q = ["Do you like {p}?", "Do you like {p} too?", "Do you love {p}?", "What do you think about {p}?"]
ABOUT_Q = ["Tell me about {p}.", "What do you know about {p}?", "Tell me something about {p}.",
           "What can you tell me about {p}?"]


def _like_answer(p: str, text: str, rng: random.Random) -> str:
    return rng.choice([f"Yes, I like {p}. {text}", f"Yes, I like {p} very much. {text}", f"I love {p}! {text}"])


def _more_answer(s: str, p: str, text: str, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return text
    return rng.choice([f"I like {p} because they are fun. {text}", f"Here is more about {p}. {text}",
                       f"{text} That is why I like {p}."])


def _filler(rng: random.Random) -> tuple[str, str]:
    """An unrelated small-talk turn (name, greeting, ability) that names no other animal or thing."""
    return rng.choice([st._identity, st._greeting, st._ability])(rng)


def _story(s: str, rng: random.Random) -> str:
    return stories.story(s, rng)


def conversation(rng: random.Random) -> tuple[str, list[dict]]:
    """(topic, messages): three user turns, three answers; the third user turn refers to the topic by pronoun."""
    s = rng.choice(list(TOPICS))
    p, text = TOPICS[s]
    opener = rng.random()
    turns: list[tuple[str, str]] = []
    if opener < 0.35:  # greeting, then the topic, then the follow-up
        turns.append(st._greeting(rng))
    kind = rng.random()
    if kind < 0.35:  # "Do you like X?" first
        turns.append((rng.choice(LIKE_Q).format(p=p), _like_answer(p, text, rng)))
    else:  # "Tell me about X." first
        turns.append((rng.choice(ABOUT_Q).format(p=p), text))
    if len(turns) == 1:  # a middle turn: thanks, or unrelated small talk
        turns.append(rng.choice(THANKS_MID) if rng.random() < 0.5 else _filler(rng))
    r = rng.random()
    if s in STORY_TOPICS and r < 0.25:
        turns.append((rng.choice(STORY_FOLLOW), _story(s, rng)))
    elif r < 0.6:
        turns.append((rng.choice(MORE_FOLLOW), _more_answer(s, p, text, rng)))
    else:
        turns.append((rng.choice(LIKE_FOLLOW), _like_answer(p, text, rng)))
    if s in STORY_TOPICS and rng.random() < 0.08:  # story first, then "what was it about?"
        req = rng.choice(stories.REQUESTS).format(a=stories._a(s), t=s)
        turns = [st._greeting(rng), (req, _story(s, rng)),
                 (rng.choice(WHAT_STORY), f"The story was about {stories._a(s)}.")]
    msgs = []
    for u, a in turns:
        msgs += [{"role": "user", "content": st._variants(u, rng)}, {"role": "assistant", "content": a}]
    return s, msgs


def load_eval(path: Path = EVAL_FILE) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["conversations"]


def generate(n: int, seed: int = 0) -> list[dict]:
    """n {"messages", "topic"} rows from random.Random(seed); conversations whose user turns include an eval
    conversation's third turn verbatim (after small_talk.normalize) are redrawn."""
    held = {st.normalize(c["turns"][2]) for c in load_eval()}
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        topic, msgs = conversation(rng)
        if any(st.normalize(m["content"]) in held for m in msgs if m["role"] == "user"):
            continue
        rows.append({"messages": msgs, "topic": topic})
    return rows


def names_topic(answer: str, topic: str) -> bool:
    p = TOPICS.get(topic, (topic + "s", ""))[0]
    return bool(re.search(rf"\b({re.escape(topic)}|{re.escape(p)})\b", answer, re.I))


def evaluate(llm_or_dir, max_tokens: int = 80) -> tuple[int, list[dict]]:
    """Every eval conversation, turn by turn: the model's greedy answer to each user turn joins the history of the
    next. Returns (how many third answers name the topic, per-conversation records)."""
    from minke import LLM, SamplingParams

    llm = llm_or_dir if hasattr(llm_or_dir, "chat") else LLM(llm_or_dir)
    convs = load_eval()
    histories: list[list[dict]] = [[] for _ in convs]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    for t in range(3):
        for h, c in zip(histories, convs):
            h.append({"role": "user", "content": c["turns"][t]})
        outs = llm.chat(histories, params, use_tqdm=False)
        for h, o in zip(histories, outs):
            h.append({"role": "assistant", "content": o.outputs[0].text.strip()})
    results = [{"topic": c["topic"], "turns": h, "hit": names_topic(h[-1]["content"], c["topic"])}
               for c, h in zip(convs, histories)]
    return sum(r["hit"] for r in results), results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the generated conversations here (jsonl)")
    ap.add_argument("--eval", metavar="MODEL_DIR", help="run the held-out three-turn eval with this model")
    ap.add_argument("--eval_out", type=Path, help="with --eval: also write every conversation and the score here")
    a = ap.parse_args(argv)
    if a.out:
        rows = generate(a.num, a.seed)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with a.out.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"messages": r["messages"]}, ensure_ascii=False) + "\n")
        print(f"{len(rows)} conversations -> {a.out}")
    if a.eval:
        hits, results = evaluate(a.eval)
        for r in results:
            print(("x " if r["hit"] else "  ") + " | ".join(f"{m['role'][0].upper()}: {m['content'][:70]}"
                                                            for m in r["turns"]))
        print(f"third answer names the topic: {hits} of {len(results)}")
        if a.eval_out:
            a.eval_out.write_text(json.dumps({"hits": hits, "n": len(results), "results": results}, indent=1))


if __name__ == "__main__":
    main()
