"""Multiple choice by loglikelihood (MMLU / CMMLU / C-Eval / ARC style, perplexity-based as the DeepSeek LLM paper
evaluates them): every option is scored as a continuation of the k-shot prompt and the likeliest one is the answer.

Two scorings. `letter`: the options are listed in the prompt ("A. ..."), and the continuations are " A", " B", ...
after "Answer:" (MMLU's original prompt, lm-eval's mmlu). `answer`: the options' own text is scored after
"Answer:" (ARC / HellaSwag style, lm-eval's arc). Metrics as lm-eval defines them: acc = argmax of the summed
loglikelihoods; acc_norm = argmax of loglikelihood / len(continuation in characters)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .backend import Backend, encode_pair

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class MCItem:
    question: str
    choices: list[str]
    answer: int  # index into choices
    subject: str = ""
    passage: str = ""  # a text the question is about (story comprehension, reading comprehension)


@dataclass
class MCStyle:
    """How a dataset words its prompt: the header over each subject's questions and the answer cue."""

    header: str = ""  # str.format(subject=...) e.g. "The following are multiple choice questions ... about {subject}."
    answer_cue: str = "Answer:"
    question_cue: str = ""  # "Question: " for answer scoring, "" (MMLU) for letters

    def render(self, item: MCItem, scoring: str) -> str:
        parts = [f"{item.passage}\n"] if item.passage else []
        if scoring == "letter":
            parts.append(f"{self.question_cue}{item.question}\n")
            parts += [f"{LETTERS[i]}. {c}\n" for i, c in enumerate(item.choices)]
        else:
            parts.append(f"{self.question_cue or 'Question: '}{item.question}\n")
        parts.append(self.answer_cue)
        return "".join(parts)


def continuations(item: MCItem, scoring: str) -> list[str]:
    if scoring == "letter":
        return [f" {LETTERS[i]}" for i in range(len(item.choices))]
    return [f" {c}" for c in item.choices]


def build_prompt(item: MCItem, shots: list[MCItem], style: MCStyle, scoring: str) -> str:
    """The k-shot prompt: the subject header, each shot with its answer, then the question up to the answer cue.
    Every question of a subject shares header + shots: the prefix the engine computes once (prefix cache)."""
    head = style.header.format(subject=item.subject.replace("_", " ")) + "\n\n" if style.header else ""
    body = "".join(style.render(s, scoring) + continuations(s, scoring)[s.answer] + "\n\n" for s in shots)
    return head + body + style.render(item, scoring)


@dataclass
class MCResult:
    metrics: dict[str, float]
    per_subject: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)


def evaluate_mc(backend: Backend, items: list[MCItem], shots_for, style: MCStyle, scoring: str,
                desc: str = "") -> MCResult:
    """shots_for(item) -> the few-shot examples for that item's prompt."""
    if scoring not in ("letter", "answer"):
        raise ValueError(f"multiple-choice scoring must be 'letter' or 'answer', got {scoring!r}")
    pairs, spans = [], []
    for item in items:
        if not 0 <= item.answer < len(item.choices):
            raise ValueError(f"{desc}: answer {item.answer} is outside the {len(item.choices)} choices of "
                             f"{item.question[:60]!r}")
        prompt = build_prompt(item, shots_for(item), style, scoring)
        start = len(pairs)
        for cont in continuations(item, scoring):
            pairs.append(encode_pair(backend.tokenizer, prompt, cont))
        spans.append((start, len(pairs), prompt))
    lls = backend.loglikelihood(pairs, desc=desc)
    samples, by_subject = [], {}
    for item, (a, b, prompt) in zip(items, spans):
        ll = [lls[i][0] for i in range(a, b)]
        conts = continuations(item, scoring)
        norm = [x / len(c) for x, c in zip(ll, conts)]
        acc = float(max(range(len(ll)), key=ll.__getitem__) == item.answer)
        acc_norm = float(max(range(len(norm)), key=norm.__getitem__) == item.answer)
        samples.append({"subject": item.subject, "question": item.question, "answer": item.answer,
                        "loglikelihoods": ll, "acc": acc, "acc_norm": acc_norm})
        by_subject.setdefault(item.subject, []).append((acc, acc_norm))
    n = len(samples)
    metrics = {"acc": sum(s["acc"] for s in samples) / n if n else 0.0,
               "acc_norm": sum(s["acc_norm"] for s in samples) / n if n else 0.0, "n": n}
    per_subject = {s: {"acc": sum(a for a, _ in v) / len(v), "acc_norm": sum(b for _, b in v) / len(v), "n": len(v)}
                   for s, v in sorted(by_subject.items())} if len(by_subject) > 1 else {}
    return MCResult(metrics, per_subject, samples)
