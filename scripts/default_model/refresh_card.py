"""Re-measure the parts of the default model's card (minke/assets/default_model/README.md) that depend on its
weights, after a pass that changed them (finetune_multi_turn.py): the on-topic story count, the small-talk score
and table, the three-turn score with every third answer, and the sample outputs. package_model.py writes the whole
card at build time; this rewrites those sections in place with the same measurements (its functions), so the card
never describes weights it does not ship. Run eval_card.py after it for the `minke eval` section.

    python scripts/default_model/refresh_card.py --model_dir minke/assets/default_model \
        --note "Last, a three-turn pass: python scripts/default_model/finetune_multi_turn.py ..."
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))
import multi_turn  # noqa: E402
import package_model as pm  # noqa: E402


def _between(text: str, start: str, end: str, new: str) -> str:
    """text with the part from the line starting `start` up to (not including) the line starting `end` replaced."""
    i = text.index(start)
    j = text.index(end, i)
    return text[:i] + new + text[j:]


def three_turn_section(model_dir: str) -> str:
    hits, results = multi_turn.evaluate(model_dir)
    rows = [f"| {'x' if r['hit'] else ' '} | {r['topic']} | "
            + " / ".join(t["content"].replace("|", "/").replace("\n", " ") for t in r["turns"][::2]) + " | "
            + r["turns"][-1]["content"].replace("|", "/").replace("\n", " ") + " |" for r in results]
    return "\n".join([
        f"Three-turn conversations: in {hits} of {len(results)} held-out conversations "
        "(`scripts/default_model/multi_turn_eval.json`: the topic is named once, in the first or second user turn, "
        "and the third refers back to it only by a pronoun) the third greedy answer names the topic, measured by "
        "`python scripts/default_model/multi_turn.py --eval minke/assets/default_model` "
        "(tests/test_default_model_multiturn.py asks for 16). Each conversation's user turns and the third answer "
        "(the model answered every turn itself; [x] = topic named):",
        "",
        "| | topic | user turns | third answer |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        "",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_dir", default=str(pm.Path(__file__).parent.parent.parent / "minke/assets/default_model"))
    ap.add_argument("--note", default=None, help="a line added at the end of 'How it was built' (the pass that ran)")
    a = ap.parse_args(argv)
    card_path = Path(a.model_dir) / "README.md"
    card = card_path.read_text(encoding="utf-8")
    out = Path(a.model_dir)

    topics = multi_turn.stories.TOPICS  # the grammar's topics (package_model.py counts the same)
    hits, n = pm.on_topic_rate(out, list(topics))
    card = re.sub(r"for each of the \d+ grammar topics, \d+ answers name X",
                  f"for each of the {n} grammar topics, {hits} answers name X", card)

    score, results = pm.small_talk_eval(out)
    small_talk = "\n".join(pm.small_talk_lines(score, results) + [""])
    if "Three-turn conversations:" in card:
        card = _between(card, "Three-turn conversations:", "<!-- minke eval -->", "")
    card = _between(card, "Small talk: ", "<!-- minke eval -->", small_talk + three_turn_section(str(out)))

    comp, chat = pm.samples(out)
    sample_lines = [f"Produced with minke on CPU (seed {pm.SAMPLE_SEED}, max 80 new tokens; sampled with temperature "
                    "0.7, top_p 0.9, repetition_penalty 1.1). Unedited.", ""]
    for prompt, how, text in comp:
        sample_lines += [f"**Completion** of `{prompt}` ({how}):", "", "> " + (prompt + text).strip()
                         .replace("\n", "\n> "), ""]
    for prompt, reason, text in chat:
        sample_lines += [f"**Chat**: User: *{prompt}* (finish: {reason})", "", "> " + text.strip()
                         .replace("\n", "\n> "), ""]
    card = _between(card, "Produced ", "## How it was built", "\n".join(sample_lines))

    if a.note and a.note not in card:
        card = card.rstrip("\n") + "\n\n" + a.note + "\n"
    card_path.write_text(card, encoding="utf-8")
    print(f"{card_path}: on topic {hits}/{n}, small talk {score:.2f}, three-turn rewritten, samples rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
