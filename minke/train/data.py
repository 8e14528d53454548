"""Training data: supervised fine-tuning examples, packed pretraining blocks, and the global-batch sampler.

Fine-tuning rows (JSON lines, a JSON array, or parquet when pyarrow is installed):
  {"instruction": str, "output": str [, "input": str]}   DeepSeek's finetune.py format (+ Alpaca's optional input)
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   dialogues, loss on assistant turns
The prompt is the model's chat template (`--prompt_format chat`), or DeepSeek finetune.py's fixed
"### Instruction:/### Response:" prompt (`--prompt_format instruction`). Labels are the input ids with every prompt
token set to -100, so the loss counts only answer tokens (the answer ends with eos, so the model learns to stop).
A row that cannot be used (bad JSON, missing or empty fields, longer than model_max_length) is skipped and counted;
an empty file, or one where every row is skipped, is an error raised before training starts.

Pretraining corpora: .txt files (one document each, or split on --doc_separator) and .jsonl/.json/.parquet rows with a
text field. Documents are tokenized (bos as the tokenizer adds it, eos appended), concatenated and cut into blocks of
model_max_length tokens.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

IGNORE_INDEX = -100
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")

# DeepSeek finetune.py's build_instruction_prompt, verbatim.
INSTRUCTION_PROMPT = (
    "You are an AI assistant, developed by DeepSeek Company. For politically sensitive questions, security and "
    "privacy issues, you will refuse to answer.\n### Instruction:\n{}\n### Response:\n"
)


class SkipExample(Exception):
    """One row cannot be used; the message is the reason, counted in DataStats."""


@dataclass
class DataStats:
    rows: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples_of_skips: list[str] = field(default_factory=list)  # the first few, with file:line

    def skip(self, where: str, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples_of_skips) < 5:
            self.examples_of_skips.append(f"{where}: {reason}")

    def summary(self) -> str:
        s = f"{self.used} of {self.rows} rows used"
        if self.skipped:
            s += "; skipped: " + ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
            s += " (first: " + "; ".join(self.examples_of_skips) + ")"
        return s


# ---- reading rows ---------------------------------------------------------------------------------------------


def data_files(path: str | Sequence[str]) -> list[str]:
    """The files behind --data_path: a file, a directory (its data files, sorted), or several of either."""
    paths = [path] if isinstance(path, str) else list(path)
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(DATA_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"--data_path {p} is a directory with no {'/'.join(DATA_SUFFIXES)} files")
            out += found
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"--data_path {p} does not exist")
    return out


def read_rows(file: str, stats: DataStats) -> Iterator[tuple[str, object]]:
    """(where, row) for every row of a .jsonl/.json/.parquet file; unparseable JSON lines are counted skips."""
    if os.path.getsize(file) == 0:
        raise ValueError(f"{file} is empty: no training data")
    if file.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{file}: reading parquet needs pyarrow (pip install pyarrow), "
                             "or convert it to JSON lines")
        for i, row in enumerate(pq.read_table(file).to_pylist()):
            yield f"{file}:row {i}", row
        return
    with open(file, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"{file} holds only whitespace: no training data")
    if file.endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        for i, row in enumerate(rows):
            yield f"{file}:item {i}", row
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            stats.rows += 1
            stats.skip(f"{file}:{n}", f"invalid JSON ({e.msg})")
            continue
        yield f"{file}:{n}", row


# ---- fine-tuning examples -------------------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX on prompt tokens


def _str_field(row: dict, name: str, required: bool = True) -> str:
    v = row.get(name)
    if v is None:
        if required:
            raise SkipExample(f"missing field '{name}'")
        return ""
    if not isinstance(v, str):
        raise SkipExample(f"field '{name}' is {type(v).__name__}, not a string")
    return v


def row_to_messages(row) -> list[dict]:
    if not isinstance(row, dict):
        raise SkipExample(f"row is a {type(row).__name__}, not an object")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise SkipExample("field 'messages' is not a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise SkipExample("a message is not {'role': system|user|assistant, 'content': str}")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            raise SkipExample("no non-empty assistant message")
        return msgs
    instruction, output = _str_field(row, "instruction"), _str_field(row, "output")
    extra = _str_field(row, "input", required=False)
    if not instruction.strip():
        raise SkipExample("empty 'instruction'")
    if not output.strip():
        raise SkipExample("empty 'output'")
    if extra.strip():
        instruction = f"{instruction}\n\n{extra}"  # Alpaca/Open-Platypus rows carry an optional input
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]


class ExampleBuilder:
    """Tokenizes messages into (input_ids, labels) with the loss on assistant text only."""

    def __init__(self, tokenizer, max_length: int, prompt_format: str = "chat"):
        if prompt_format not in ("chat", "instruction"):
            raise ValueError(f"--prompt_format must be 'chat' or 'instruction', got {prompt_format!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{tokenizer.source}: the tokenizer has no eos token; answers could not end")
        self.tok, self.max_length, self.format = tokenizer, max_length, prompt_format

    def _enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def _segments(self, msgs: list[dict]) -> list[tuple[str, bool]]:
        """(text, is_target) pieces whose concatenation is the whole rendered conversation."""
        if self.format == "instruction":
            if len(msgs) != 2 or msgs[0]["role"] != "user":
                raise SkipExample("--prompt_format instruction takes one instruction and one output")
            return [(INSTRUCTION_PROMPT.format(msgs[0]["content"].strip()), False),
                    (f"{msgs[1]['content']}\n{self.tok.eos_token}", True)]
        # Chat template: render the prefix up to each assistant turn (with the generation prompt) and through it;
        # the difference is the answer. Tokenizing the pieces separately keeps the label boundary exact and matches
        # inference, where the prompt is tokenized alone and the answer is generated after it.
        pieces, done = [], ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            if not any(x["role"] == "user" for x in msgs[:i]):
                raise SkipExample("an assistant message comes before any user message")
            prompt = self.tok.render_chat(msgs[:i], add_generation_prompt=True)
            full = self.tok.render_chat(msgs[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ValueError(f"{self.tok.source}: the chat template does not render conversations as growing "
                                 "prefixes, so answer tokens cannot be located; use --prompt_format instruction")
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        return pieces

    def __call__(self, row) -> Example:
        msgs = row_to_messages(row)
        ids, labels = [], []
        for text, is_target in self._segments(msgs):
            if not text:
                continue
            if not ids and not is_target and self.format == "instruction":
                t = self.tok.encode(text, add_special_tokens=True)  # finetune.py's tokenizer call adds bos
            else:
                t = self._enc(text)
            ids += t
            labels += t if is_target else [IGNORE_INDEX] * len(t)
        if len(ids) > self.max_length:
            raise SkipExample(f"longer than model_max_length={self.max_length} tokens")
        if all(x == IGNORE_INDEX for x in labels[1:]):
            raise SkipExample("no answer tokens")
        return Example(ids, labels)


def load_sft_dataset(path, tokenizer, max_length: int, prompt_format: str = "chat",
                     log=print) -> tuple[list[Example], DataStats]:
    builder = ExampleBuilder(tokenizer, max_length, prompt_format)
    stats, examples = DataStats(), []
    for file in data_files(path):
        if file.endswith(".txt"):
            raise ValueError(f"{file}: fine-tuning data must be JSON lines of instruction/output (or messages)")
        for where, row in read_rows(file, stats):
            stats.rows += 1
            try:
                examples.append(builder(row))
            except SkipExample as e:
                stats.skip(where, str(e))
    stats.used = len(examples)
    log(f"data: {stats.summary()}")
    if not examples:
        raise ValueError(f"no usable training examples in {path}: {stats.summary()}")
    return examples, stats


# ---- pretraining corpus ---------------------------------------------------------------------------------------


def iter_documents(files: list[str], text_field: str, doc_separator: str | None, stats: DataStats) -> Iterator[str]:
    for file in files:
        if file.endswith(".txt"):
            if os.path.getsize(file) == 0:
                raise ValueError(f"{file} is empty: no training data")
            with open(file, encoding="utf-8") as f:
                text = f.read()
            docs = text.split(doc_separator) if doc_separator else [text]
            for d in docs:
                stats.rows += 1
                if d.strip():
                    yield d
                else:
                    stats.skip(file, "empty document")
            continue
        for where, row in read_rows(file, stats):
            stats.rows += 1
            v = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(v, str) or not v.strip():
                stats.skip(where, f"no non-empty string field '{text_field}'")
                continue
            yield v


def load_pretrain_blocks(path, tokenizer, block_size: int, text_field: str = "text",
                         doc_separator: str | None = None, log=print) -> torch.Tensor:
    """Packed token blocks [N, block_size] (int64). Each document: tokenizer's bos (if it adds one), text, eos."""
    stats = DataStats()
    parts: list[torch.Tensor] = []  # int32 per document: a Python int list would take ~28 bytes a token
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for doc in iter_documents(data_files(path), text_field, doc_separator, stats):
        parts.append(torch.tensor(tokenizer.encode(doc, add_special_tokens=True) + eos, dtype=torch.int32))
        stats.used += 1
    total = sum(len(p) for p in parts)
    n = total // block_size
    log(f"data: {stats.summary()}; {total} tokens -> {n} blocks of {block_size}")
    if n == 0:
        raise ValueError(f"the corpus at {path} has {total} tokens, fewer than one block of "
                         f"model_max_length={block_size}")
    return torch.cat(parts)[: n * block_size].long().view(n, block_size)


def check_vocab(max_id: int, vocab_size: int, where: str) -> None:
    if max_id >= vocab_size:
        raise ValueError(f"the data has token id {max_id} but the model at {where} has vocab_size {vocab_size}: "
                         "the tokenizer does not belong to this model")


# ---- batching -------------------------------------------------------------------------------------------------


class GlobalBatchSampler:
    """Which examples each rank's micro-batches hold at each optimizer step.

    A step consumes a global batch of G = per_device_batch * accumulation * world examples from a per-epoch
    permutation (seeded by seed + epoch, the same on every rank); a short last batch wraps around to the epoch's
    start so every micro-batch is full. Slot j = micro * world + rank takes examples [j*B, (j+1)*B) of the global
    batch. The examples of a step depend only on G, so one process and several with the same global batch see the
    same data, and a resumed run sees what an uninterrupted one would have."""

    def __init__(self, n_examples: int, per_device_batch: int, accumulation: int, world: int, seed: int):
        self.n, self.bs, self.accum, self.world, self.seed = n_examples, per_device_batch, accumulation, world, seed
        self.global_batch = per_device_batch * accumulation * world
        self.steps_per_epoch = math.ceil(n_examples / self.global_batch)
        self._perm_epoch, self._perm = None, None

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def global_indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self._epoch_perm(epoch)
        idx = perm[k * self.global_batch:(k + 1) * self.global_batch].tolist()
        while len(idx) < self.global_batch:
            idx += perm[: self.global_batch - len(idx)].tolist()
        return idx

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        idx = self.global_indices(step)
        return [idx[(m * self.world + rank) * self.bs:(m * self.world + rank + 1) * self.bs] for m in range(self.accum)]


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids [B, T] (pad_id) and labels [B, T] (IGNORE_INDEX on padding). With causal attention,
    right padding never changes the logits of real tokens."""
    t = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return ids, labels


class SFTData:
    """Fine-tuning examples behind the sampler's indices."""

    def __init__(self, examples: list[Example], pad_id: int):
        self.examples, self.pad_id = examples, pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return collate([self.examples[i] for i in indices], self.pad_id)

    def num_tokens(self, indices: list[int]) -> int:
        return sum(len(self.examples[i].input_ids) for i in indices)


class BlockData:
    """Packed pretraining blocks [N, L]: labels are the inputs (every token is a target)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.blocks[indices]
        return ids, ids.clone()

    def num_tokens(self, indices: list[int]) -> int:
        return len(indices) * self.blocks.shape[1]
