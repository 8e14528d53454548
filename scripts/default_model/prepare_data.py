"""Build the training data of minke's embedded default model from corpora that ship inside ordinary packages.

Sources (both fetched by scripts/build_default_model.sh with the ordinary package clients, nothing else):
- Jane Austen's six completed novels, from the Debian package `r-cran-janeaustenr` (the CRAN package
  janeaustenr by Julia Silge, MIT licence; the novels themselves are in the public domain, from Project
  Gutenberg). The texts are stored as R lazy-load data (data/Rdata.rdx + Rdata.rdb); the PyPI package `rdata`
  parses R's serialization format, so R itself is not needed.
- ChatterBot's English dialogue corpus, from the PyPI package `chatterbot-corpus` (BSD-3-Clause, Gunther Cox):
  YAML files of short conversations.

Outputs in --out_dir:
- pretrain.jsonl / pretrain_valid.jsonl: {"text": paragraph} per line, the novels cut into paragraphs (chapter
  headings, title pages and editorial notes dropped, line wraps joined). `minke train` packs them into blocks.
- sft.jsonl: {"instruction", "output"} per line, the format of DeepSeek's finetune/finetune.py, made of
  (a) ChatterBot statement -> reply pairs, (b) story requests answered with an Austen paragraph that mentions the
  requested topic ("Tell me a story about the garden." -> a paragraph about a garden), (c) "continue this
  story" requests whose answer is the rest of a paragraph. (b) and (c) are derived from the corpus itself, in the
  spirit of TinyStories-Instruct: the answers are real text, only the question is built around them.
- corpus_stats.json: counts, so the model card can state them.

Usage: python scripts/default_model/prepare_data.py --austen_deb X.deb --chatterbot_whl Y.whl --out_dir DIR
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import re
import subprocess
import tempfile
import zipfile
import zlib
from pathlib import Path

AUSTEN_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")

# ChatterBot categories kept: everyday conversation. "coding" and "tech_support" (IT help-desk scripts) are left
# out: a model this small cannot carry technical answers, and they would crowd out the conversational ones.
CHATTERBOT_CATEGORIES = (
    "ai", "botprofile", "computers", "conversations", "emotion", "food", "gossip", "greetings", "health",
    "history", "humor", "literature", "money", "movies", "politics", "psychology", "science", "sports", "trivia",
)
# In these files a conversation is a real chain (A says, B answers, A answers back ...); in the others the items
# after the first are alternative replies to the first.
CHATTERBOT_CHAINS = ("conversations", "greetings")

# Everyday topics a user may ask a story about. Only topics that occur in enough paragraphs are used.
STORY_TOPICS = (
    "letter", "ball", "dance", "dinner", "walk", "garden", "house", "park", "carriage", "horse", "rain",
    "weather", "music", "piano", "book", "party", "visit", "journey", "sea", "village", "town", "church", "tea",
    "dress", "shop", "wedding", "child", "baby", "morning", "evening", "night", "summer", "winter", "room",
    "fire", "window", "door", "road", "tree", "flowers", "field", "river", "hill", "cottage", "school", "friend",
    "sister", "brother", "mother", "father", "family", "uncle", "aunt", "cousin", "daughter", "son", "husband",
    "wife", "girl", "boy", "gentleman", "lady", "officer", "sailor", "doctor", "servant", "neighbour",
    "stranger", "secret", "surprise", "picture", "song", "game", "breakfast", "supper", "cake", "fruit", "dog",
    "bird", "ship", "sun", "moon", "snow", "storm", "hat", "gloves", "ring", "gift", "birthday", "Christmas",
    "holiday", "home", "London", "Bath", "kitchen", "library", "table", "chair", "bed", "pen", "newspaper",
    "accident", "dream", "present",
)
STORY_PROMPTS = (
    "Tell me a story about {a} {t}.",
    "Tell me a story about the {t}.",
    "Write a short story about {a} {t}.",
    "Can you tell me a story about {a} {t}?",
    "Please tell me a short story about {t}.",
    "I would like a story about {a} {t}.",
    "Tell me about {a} {t}.",
    "Write a few sentences about {a} {t}.",
)
CONTINUE_PROMPTS = (
    "Continue the story: {s}",
    "Please continue this story: {s}",
    "What happens next? {s}",
    "Finish this story: {s}",
)


# ----------------------------------------------------------------------------------------------------------------
# Austen: .deb -> R lazy-load data -> list of lines per novel


def extract_deb(deb: Path, dest: Path) -> None:
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    except FileNotFoundError as e:
        raise SystemExit("dpkg-deb is needed to unpack the Debian package (install the 'dpkg' package)") from e


def _r_unserialize(payload: bytes):
    import rdata  # PyPI `rdata`: parser for R's serialization format

    return rdata.conversion.convert(rdata.parser.parse_data(payload))


def read_austen_novels(deb: Path) -> dict[str, list[str]]:
    """{book: [line, ...]}. R lazy-load data: Rdata.rdx is a gzipped serialized index {variables: {name: [offset,
    length]}}; each object in Rdata.rdb is a 4-byte big-endian length followed by a zlib stream of the serialized
    character vector (one element per line of the Gutenberg text)."""
    with tempfile.TemporaryDirectory() as tmp:
        extract_deb(deb, Path(tmp))
        data = Path(tmp) / AUSTEN_DATA_DIR
        index = _r_unserialize(gzip.decompress((data / "Rdata.rdx").read_bytes()))
        rdb = (data / "Rdata.rdb").read_bytes()
    books = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset):int(offset) + int(length)]
        books[str(name)] = [str(line) for line in _r_unserialize(zlib.decompress(blob[4:]))]
    missing = [b for b in AUSTEN_BOOKS if b not in books]
    if missing:
        raise SystemExit(f"{deb}: the janeaustenr data lacks {missing}; found {sorted(books)}")
    return books


_HEADING = re.compile(r"^(chapter|volume|vol\.)\s+[\divxlc]+\.?$", re.IGNORECASE)


def clean_paragraph(text: str) -> str:
    text = text.replace("_", "")  # Gutenberg marks italics as _word_
    text = text.replace("--", " -- ")
    text = re.sub(r"\s+", " ", text).strip()
    return text


def novel_paragraphs(lines: list[str]) -> list[str]:
    """Blank-line separated paragraphs with wraps joined; headings, title pages and editorial notes dropped."""
    paras, cur = [], []
    for line in lines + [""]:
        if line.strip():
            cur.append(line.strip())
            continue
        if cur:
            paras.append(clean_paragraph(" ".join(cur)))
            cur = []
    out = []
    for p in paras:
        words = p.split()
        if _HEADING.match(p) or len(words) < 4:
            continue  # headings, "THE END", "by Jane Austen", "(1818)"
        if p.isupper() or "Jane Austen" in p or "first edition" in p:
            continue  # title lines and the editorial note at the end of Northanger Abbey
        out.append(p)
    return out


# ----------------------------------------------------------------------------------------------------------------
# ChatterBot: wheel -> (statement, reply) pairs


def _clean_turn(t) -> str:
    t = re.sub(r"\s+", " ", str(t)).strip()
    if t.isupper() and len(t) > 3:  # a few questions are written in capitals: "WHAT IS BASKETBALL"
        t = t.capitalize()
    return t


def read_chatterbot_pairs(whl: Path) -> list[tuple[str, str, str]]:
    import yaml

    pairs = []
    with zipfile.ZipFile(whl) as z:
        for cat in CHATTERBOT_CATEGORIES:
            name = f"chatterbot_corpus/data/english/{cat}.yml"
            try:
                doc = yaml.safe_load(io.TextIOWrapper(z.open(name), encoding="utf-8"))
            except KeyError as e:
                raise SystemExit(f"{whl}: {name} is missing; is this chatterbot-corpus 1.3.x?") from e
            for conv in doc.get("conversations") or []:
                turns = [_clean_turn(t) for t in conv if t is not None]
                turns = [t for t in turns if len(t) >= 2 and re.search(r"[A-Za-z0-9]", t)]
                if len(turns) < 2:
                    continue
                if cat in CHATTERBOT_CHAINS:
                    pairs += [(cat, turns[i], turns[i + 1]) for i in range(len(turns) - 1)]
                else:
                    pairs += [(cat, turns[0], reply) for reply in turns[1:]]
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# Story instructions derived from the paragraphs


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _sentences(p: str) -> list[str]:
    return [s for s in re.split(r"(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=[\"'A-Z])", p) if s]


def _trim(p: str, max_words: int) -> str | None:
    """The paragraph cut after the last sentence that still fits in max_words, or None if even the first does not."""
    out, n = [], 0
    for s in _sentences(p):
        n += len(s.split())
        if n > max_words:
            break
        out.append(s)
    return " ".join(out) if out else None


def story_examples(paras: list[str], rng: random.Random, per_topic: int, max_words: int) -> tuple[list[dict], list[str]]:
    by_topic = {}
    for t in STORY_TOPICS:
        pat = re.compile(rf"\b{re.escape(t)}\b", re.IGNORECASE if t.islower() else 0)
        hits = []
        for p in paras:
            if 25 <= len(p.split()) and pat.search(p):
                trimmed = _trim(p, max_words)
                if trimmed and len(trimmed.split()) >= 20 and pat.search(trimmed):
                    hits.append(trimmed)
        if len(hits) >= 5:
            by_topic[t] = hits
    out = []
    for t, hits in by_topic.items():
        for p in rng.sample(hits, min(per_topic, len(hits))):
            prompt = rng.choice(STORY_PROMPTS).format(a=_article(t), t=t)
            if t[0].isupper():  # proper names take no article
                prompt = prompt.replace(f"{_article(t)} {t}", t).replace(f"the {t}", t)
            out.append({"instruction": prompt, "output": p})
    return out, sorted(by_topic)


def continue_examples(paras: list[str], rng: random.Random, n: int, max_words: int) -> list[dict]:
    cands = []
    for p in paras:
        sents = _sentences(p)
        if len(sents) >= 3 and 8 <= len(sents[0].split()) <= 40:
            rest = _trim(" ".join(sents[1:]), max_words)
            if rest and len(rest.split()) >= 15:
                cands.append((sents[0], rest))
    return [{"instruction": rng.choice(CONTINUE_PROMPTS).format(s=s), "output": r}
            for s, r in rng.sample(cands, min(n, len(cands)))]


# ----------------------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--austen_deb", type=Path, required=True, help="r-cran-janeaustenr_*.deb")
    ap.add_argument("--chatterbot_whl", type=Path, required=True, help="chatterbot_corpus-*.whl")
    ap.add_argument("--out_dir", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--valid_fraction", type=float, default=0.01)
    ap.add_argument("--stories_per_topic", type=int, default=14)
    ap.add_argument("--continue_examples", type=int, default=800)
    ap.add_argument("--chat_repeats", type=int, default=2, help="ChatterBot pairs are short: repeat them")
    ap.add_argument("--max_answer_words", type=int, default=110)
    a = ap.parse_args(argv)
    for p in (a.austen_deb, a.chatterbot_whl):
        if not p.is_file():
            raise SystemExit(f"input file not found: {p}")
    rng = random.Random(a.seed)
    a.out_dir.mkdir(parents=True, exist_ok=True)

    books = read_austen_novels(a.austen_deb)
    paras = [p for b in AUSTEN_BOOKS for p in novel_paragraphs(books[b])]
    order = list(range(len(paras)))
    rng.shuffle(order)
    n_valid = max(1, int(len(paras) * a.valid_fraction))
    valid_idx = set(order[:n_valid])
    train_paras = [p for i, p in enumerate(paras) if i not in valid_idx]  # book order kept: chunks stay coherent
    valid_paras = [p for i, p in enumerate(paras) if i in valid_idx]
    write_jsonl(a.out_dir / "pretrain.jsonl", [{"text": p} for p in train_paras])
    write_jsonl(a.out_dir / "pretrain_valid.jsonl", [{"text": p} for p in valid_paras])

    pairs = read_chatterbot_pairs(a.chatterbot_whl)
    chat = [{"instruction": q, "output": r} for _, q, r in pairs] * a.chat_repeats
    stories, topics = story_examples(train_paras, rng, a.stories_per_topic, a.max_answer_words)
    conts = continue_examples(train_paras, rng, a.continue_examples, a.max_answer_words)
    sft = chat + stories + conts
    rng.shuffle(sft)
    write_jsonl(a.out_dir / "sft.jsonl", sft)

    stats = {
        "austen_paragraphs_train": len(train_paras), "austen_paragraphs_valid": len(valid_paras),
        "austen_words_train": sum(len(p.split()) for p in train_paras),
        "chatterbot_pairs": len(pairs), "chatterbot_repeats": a.chat_repeats,
        "story_examples": len(stories), "story_topics": topics, "continue_examples": len(conts),
        "sft_examples": len(sft), "sft_words": sum(len((r["instruction"] + " " + r["output"]).split()) for r in sft),
    }
    (a.out_dir / "corpus_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps({k: v for k, v in stats.items() if k != "story_topics"}))


if __name__ == "__main__":
    main()
