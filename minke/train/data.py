"""Training data: supervised fine-tuning examples, packed pretraining blocks, and the global-batch sampler.

Fine-tuning rows (JSON lines, a JSON array, or parquet when pyarrow is installed):
  {"instruction": str, "output": str [, "input": str]}   DeepSeek's finetune.py format (+ Alpaca's optional input)
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   dialogues, loss on assistant turns
Prompt formats (`--prompt_format`):
  chat         the model's chat template; answers end with the real eos token (default: what the chat models and
               `minke chat` / the OpenAI server use, and the model learns to stop where inference stops)
  instruction  DeepSeek finetune.py's fixed "### Instruction:/### Response:" prompt, answers ending in a real eos
  deepseek     finetune.py's preprocessing exactly: bos + prompt + f"{output}\n<|EOT|>" tokenized as one string
               (`<|EOT|>` is no token of these tokenizers but plain text, 5 tokens with DeepSeek LLM/V2's; DeepSeek-MoE
               issues #28/#37),
               the first len(tokenize(bos + prompt)) tokens masked, truncated to model_max_length, `input` ignored
Labels are the input ids with every prompt token set to -100, so the loss counts only answer tokens.
Rows longer than model_max_length are skipped (`--long_rows skip`, default of chat/instruction) or cut to it
(`--long_rows truncate`, finetune.py's behaviour and the default of `deepseek`); an Alpaca/Open-Platypus `input`
field is appended to the instruction (`--input_field append`) or ignored (`ignore`, finetune.py); both are counted.
A row that cannot be used (bad JSON or UTF-8, missing or empty fields, too long, no answer tokens) is skipped and
counted with its file:line; an empty file, or one where every row is skipped, is an error raised before training.
A row whose text is longer than model_max_length x the longest token of the vocabulary (in UTF-8 bytes) cannot fit,
so it is skipped (or cut) before tokenizing: a 50 MB row costs no tokenizer time or memory.

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

PROMPT_FORMATS = ("chat", "instruction", "deepseek")
LONG_ROWS = ("skip", "truncate")
INPUT_FIELD = ("append", "ignore")
EOT_TOKEN = "<|EOT|>"  # finetune.py's end-of-answer string: plain text to these tokenizers

# DeepSeek finetune.py's build_instruction_prompt, verbatim (its leading newline is lstripped there).
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
    notes: Counter = field(default_factory=Counter)  # rows used but changed: truncated, input appended/ignored

    def skip(self, where: str, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples_of_skips) < 5:
            self.examples_of_skips.append(f"{where}: {reason}")

    def summary(self) -> str:
        s = f"{self.used} of {self.rows} rows used"
        if self.skipped:
            s += "; skipped: " + ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
            s += " (first: " + "; ".join(self.examples_of_skips) + ")"
        if self.notes:
            s += "; " + ", ".join(f"{n} {r}" for r, n in sorted(self.notes.items()))
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


def _json_error(e: json.JSONDecodeError) -> str:
    return f"invalid JSON ({e.msg} at column {e.colno})"


def read_rows(file: str, stats: DataStats) -> Iterator[tuple[str, object]]:
    """(where, row) for every row of a .jsonl/.json/.parquet file. A JSON line that is not valid UTF-8 or not valid
    JSON is a counted skip (file:line), never the end of the file."""
    if os.path.getsize(file) == 0:
        raise ValueError(f"{file} is empty: no training data")
    if file.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{file}: reading parquet needs pyarrow (pip install 'minke[train]' or pyarrow), "
                             "or convert it to JSON lines") from None
        try:
            pf = pq.ParquetFile(file)
        except Exception as e:  # pyarrow.ArrowInvalid and friends: one line naming the file
            raise ValueError(f"{file}: not a readable parquet file ({e})") from None
        i = 0
        for batch in pf.iter_batches(batch_size=4096):  # streamed: a large file never sits in memory twice
            for row in batch.to_pylist():
                yield f"{file}:row {i}", row
                i += 1
        return
    with open(file, "rb") as f:
        data = f.read()
    if not data.strip():
        raise ValueError(f"{file} holds only whitespace: no training data")
    if file.endswith(".json") and data.lstrip().startswith(b"["):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise ValueError(f"{file}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); a JSON array cannot "
                             "skip one row: fix the byte or use JSON lines") from None
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, row in enumerate(rows):
            yield f"{file}:item {i}", row
        return
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            stats.rows += 1
            stats.skip(f"{file}:{n}", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            stats.rows += 1
            stats.skip(f"{file}:{n}", _json_error(e))
            continue
        yield f"{file}:{n}", row


# ---- fine-tuning examples -------------------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX on prompt tokens
    notes: tuple[str, ...] = ()  # what was done to the row (counted in DataStats.notes)


@dataclass
class SFTOptions:
    """How rows become examples. None = the prompt format's default (finetune.py's choices for `deepseek`)."""

    prompt_format: str = "chat"
    long_rows: str | None = None  # "skip" | "truncate"
    input_field: str | None = None  # "append" | "ignore"

    def __post_init__(self):
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"--prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        deepseek = self.prompt_format == "deepseek"
        self.long_rows = self.long_rows or ("truncate" if deepseek else "skip")
        self.input_field = self.input_field or ("ignore" if deepseek else "append")
        if self.long_rows not in LONG_ROWS:
            raise ValueError(f"--long_rows must be one of {LONG_ROWS}, got {self.long_rows!r}")
        if self.input_field not in INPUT_FIELD:
            raise ValueError(f"--input_field must be one of {INPUT_FIELD}, got {self.input_field!r}")

    def describe(self) -> str:
        return (f"prompt format {self.prompt_format}, rows over model_max_length: {self.long_rows}, "
                f"'input' field: {self.input_field}")


def _str_field(row: dict, name: str, required: bool = True) -> str:
    v = row.get(name)
    if v is None:
        if required:
            raise SkipExample(f"missing field '{name}'")
        return ""
    if not isinstance(v, str):
        raise SkipExample(f"field '{name}' is {type(v).__name__}, not a string")
    return v


def row_to_messages(row, input_field: str = "append", allow_empty: bool = False) -> tuple[list[dict], list[str]]:
    """(messages, notes). `allow_empty`: empty instruction/output strings are used as they are (finetune.py)."""
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
        return msgs, []
    instruction, output = _str_field(row, "instruction"), _str_field(row, "output")
    extra = _str_field(row, "input", required=False)
    if not allow_empty and not instruction.strip():
        raise SkipExample("empty 'instruction'")
    if not allow_empty and not output.strip():
        raise SkipExample("empty 'output'")
    notes = []
    if extra.strip():
        if input_field == "append":
            instruction = f"{instruction}\n\n{extra}"  # Alpaca/Open-Platypus rows carry an optional input
            notes.append("with 'input' appended to the instruction")
        else:
            notes.append("with a non-empty 'input' ignored")
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}], notes


def max_token_bytes(tokenizer) -> int:
    """An upper bound on the UTF-8 bytes one token stands for: the longest token string, UTF-8 encoded (a
    byte-level token's string has one character per byte, each at least one byte, so this never undercounts)."""
    return max(len(t.encode("utf-8")) for t in tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size)))


class ExampleBuilder:
    """Tokenizes rows into (input_ids, labels) with the loss on answer text only (see the module docstring)."""

    def __init__(self, tokenizer, max_length: int, prompt_format: str | SFTOptions = "chat"):
        self.opts = prompt_format if isinstance(prompt_format, SFTOptions) else SFTOptions(prompt_format)
        if tokenizer.eos_token_id is None and self.opts.prompt_format != "deepseek":
            raise ValueError(f"{tokenizer.source}: the tokenizer has no eos token; answers could not end")
        self.tok, self.max_length, self.format = tokenizer, max_length, self.opts.prompt_format
        self._byte_bound = None

    @property
    def byte_bound(self) -> int:
        """Text longer than this many UTF-8 bytes has more than max_length tokens."""
        if self._byte_bound is None:
            self._byte_bound = self.max_length * max_token_bytes(self.tok)
        return self._byte_bound

    def _enc(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # Never tokenize more than can matter: past 2x the bound (plus slack for the word the cut falls in) the
        # text only adds tokens after the first max_length. The cut changes the tokens of the word it splits only,
        # which lies past the first max_length tokens unless one word spans more than the bound.
        limit = 2 * self.byte_bound + 4096
        if len(text) > limit // 4 and len(text.encode("utf-8")) > limit:
            text = text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

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

    def _deepseek(self, msgs: list[dict]) -> tuple[list[int], list[int]]:
        """finetune.py's train_tokenize_function + preprocess: source and source+target each tokenized with bos and
        truncated to model_max_length; the first len(source tokens) of the joint tokens are masked."""
        if len(msgs) != 2 or msgs[0]["role"] != "user":
            raise SkipExample("--prompt_format deepseek takes one instruction and one output")
        source = INSTRUCTION_PROMPT.format(msgs[0]["content"].strip())
        target = f"{msgs[1]['content']}\n{EOT_TOKEN}"
        ids = self._enc(source + target, add_special_tokens=True)
        n_source = min(len(self._enc(source, add_special_tokens=True)), self.max_length)
        # Longer than max_length: the caller cuts (truncate) or skips, as for the other formats.
        return ids, [IGNORE_INDEX] * min(n_source, len(ids)) + ids[n_source:]

    def __call__(self, row) -> Example:
        msgs, notes = row_to_messages(row, self.opts.input_field, allow_empty=self.format == "deepseek")
        truncate = self.opts.long_rows == "truncate"
        if not truncate:
            n_bytes = sum(len(m["content"].encode("utf-8")) for m in msgs)
            if n_bytes > self.byte_bound:  # cannot fit: skip it without tokenizing
                raise SkipExample(f"longer than model_max_length={self.max_length} tokens")
        if self.format == "deepseek":
            ids, labels = self._deepseek(msgs)
        else:
            ids, labels = [], []
            for text, is_target in self._segments(msgs):
                if not text:
                    continue
                # finetune.py's tokenizer call adds bos to its prompt; chat templates write their own bos.
                t = self._enc(text, add_special_tokens=not ids and not is_target and self.format == "instruction")
                ids += t
                labels += t if is_target else [IGNORE_INDEX] * len(t)
                if truncate and len(ids) >= self.max_length:
                    break
        if len(ids) > self.max_length:
            if not truncate:
                raise SkipExample(f"longer than model_max_length={self.max_length} tokens")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            notes = [*notes, f"truncated to model_max_length={self.max_length}"]
        if all(x == IGNORE_INDEX for x in labels[1:]):
            raise SkipExample("no answer tokens" + (" within model_max_length" if truncate else ""))
        return Example(ids, labels, tuple(notes))


def load_sft_dataset(path, tokenizer, max_length: int, prompt_format: str | SFTOptions = "chat",
                     log=print) -> tuple[list[Example], DataStats]:
    builder = ExampleBuilder(tokenizer, max_length, prompt_format)
    log(f"data: {builder.opts.describe()}")
    stats, examples = DataStats(), []
    for file in data_files(path):
        if file.endswith(".txt"):
            raise ValueError(f"{file}: fine-tuning data must be JSON lines of instruction/output (or messages)")
        for where, row in read_rows(file, stats):
            stats.rows += 1
            try:
                ex = builder(row)
            except SkipExample as e:
                stats.skip(where, str(e))
                continue
            stats.notes.update(ex.notes)
            examples.append(ex)
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
    same data, and a resumed run sees what an uninterrupted one would have.

    `lengths` (--group_by_length): the permutation is cut into megabatches of 50 global batches and each is sorted
    by length, longest first (transformers' LengthGroupedSampler), so a batch pads little."""

    MEGABATCH = 50

    def __init__(self, n_examples: int, per_device_batch: int, accumulation: int, world: int, seed: int,
                 lengths: Sequence[int] | None = None):
        self.n, self.bs, self.accum, self.world, self.seed = n_examples, per_device_batch, accumulation, world, seed
        self.lengths = None if lengths is None else torch.as_tensor(list(lengths))
        self.global_batch = per_device_batch * accumulation * world
        self.steps_per_epoch = math.ceil(n_examples / self.global_batch)
        self._perm_epoch, self._perm = None, None

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g)
            if self.lengths is not None:
                size = self.MEGABATCH * self.global_batch
                parts = []
                for mb in perm.split(size):
                    order = torch.sort(self.lengths[mb], descending=True, stable=True).indices
                    parts.append(mb[order])
                perm = torch.cat(parts)
            self._perm, self._perm_epoch = perm, epoch
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

    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.examples]


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

    def lengths(self) -> list[int]:
        return [self.blocks.shape[1]] * self.blocks.shape[0]
