"""Tool calls recognised in a model's output text, incrementally (streaming) or at once, in the format of
minke/tokenizer/tool_prompt.py: `<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>` blocks among plain
text (vLLM's `hermes` parser reads the same format).

One incremental parser serves both paths: the non-streamed response is `feed(whole text)` + `finish()`, the stream
feeds each text delta. Every decision depends only on text already seen, and what is sent is always a prefix of the
final value, so the streamed content and argument fragments concatenate to exactly the non-streamed message:

- text outside blocks is content; a tail that may be the start of `<tool_call>` is held back until it is not.
  Content that is only whitespace is held too, and dropped when the message has tool calls (content None).
- a block whose body starts `{"name": "...", "arguments": ` sends the name (with a new `call_...` id) as soon as
  that prefix is complete, then the arguments as they come: the raw text of the object (or array) after
  `"arguments": `, through the bracket that closes it (strings skipped); what follows it is not arguments. A
  scalar instead of an object is sent when the block ends (up to its last `}`).
- a block that does not start that way becomes a call when complete if its body is a JSON object with a string
  "name" and "arguments" (sent whole then), else it stays content, tags included.
- a block cut off by the end of generation (max_tokens) counts as complete at that point.
- with `max_calls` (1 when parallel_tool_calls is false), blocks after that many calls are dropped.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from ..tokenizer.tool_prompt import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

# The body prefix that names the call, complete once the first character of the arguments is there.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text as the model wrote it


@dataclass
class ToolCallDelta:
    """One streamed piece of call `index`: the first carries id and name (arguments ""), later ones fragments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass
class ParsedDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __iadd__(self, other: "ParsedDelta") -> "ParsedDelta":
        self.content += other.content
        self.tool_calls += other.tool_calls
        return self


class _BracketScan:
    """How far a JSON object / array value reaches in a growing text: through the bracket that closes the first
    one (strings and escapes skipped), or all of it while still open."""

    def __init__(self):
        self.pos, self.depth, self.in_str, self.escape, self.done = 0, 0, False, False, False

    def advance(self, text: str) -> int:
        while not self.done and self.pos < len(text):
            ch = text[self.pos]
            self.pos += 1
            if self.in_str:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_str = False
            elif ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                self.done = self.depth == 0
        return self.pos


def _longest_prefix_tail(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []
        self._content: list[str] = []  # all content so far
        self._content_sent = 0  # characters of "".join(_content) sent
        self._buf = ""  # unprocessed text (outside a block) or the open block's body
        self._in_block = False
        self._skip = False  # the open block is dropped (max_calls reached)
        self._head: re.Match | None = None  # the open block's name prefix, once complete
        self._args_sent = 0  # characters of the open block's arguments sent
        self._brackets = _BracketScan()  # where the open block's arguments value ends
        self._finished = False

    # ------------------------------------------------------------------ API
    def feed(self, text: str) -> ParsedDelta:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        out = ParsedDelta()
        self._scan(out, final=False)
        out.content += self._content_delta(final=False)
        return out

    def finish(self) -> ParsedDelta:
        """The end of generation: an open block ends here, held text is released."""
        out = ParsedDelta()
        self._scan(out, final=True)
        out.content += self._content_delta(final=True)
        self._finished = True
        return out

    @property
    def content(self) -> str | None:
        text = "".join(self._content)
        return None if self.calls and not text.strip() else text

    # ------------------------------------------------------------------ scanning
    def _scan(self, out: ParsedDelta, final: bool) -> None:
        while True:
            if not self._in_block:
                k = self._buf.find(TOOL_CALL_OPEN)
                if k < 0:
                    hold = 0 if final else _longest_prefix_tail(self._buf, TOOL_CALL_OPEN)
                    self._content.append(self._buf[:len(self._buf) - hold])
                    self._buf = self._buf[len(self._buf) - hold:]
                    return
                self._content.append(self._buf[:k])
                self._buf = self._buf[k + len(TOOL_CALL_OPEN):]
                self._in_block, self._head, self._args_sent = True, None, 0
                self._brackets = _BracketScan()
                self._skip = self.max_calls is not None and len(self.calls) >= self.max_calls
                continue
            k = self._buf.find(TOOL_CALL_CLOSE)
            if k < 0 and not final:
                if not self._skip:
                    self._stream_block(out, self._buf, complete=False)
                return
            body = self._buf if k < 0 else self._buf[:k]
            self._buf = "" if k < 0 else self._buf[k + len(TOOL_CALL_CLOSE):]
            if not self._skip:
                self._stream_block(out, body, complete=True)
            self._in_block = False
            if k < 0:
                return

    def _stream_block(self, out: ParsedDelta, body: str, complete: bool) -> None:
        if self._head is None:
            self._head = _HEAD.match(body)
            if self._head is not None:
                name = json.loads(f'"{self._head.group(1)}"')
                self.calls.append(ToolCall(new_call_id(), name, ""))
                out.tool_calls.append(ToolCallDelta(len(self.calls) - 1, "", self.calls[-1].id, name))
        if self._head is None:
            if complete:
                self._whole_block(out, body)
            return
        region = body[self._head.end():]
        if region[0] in "{[":  # the value ends where its brackets close: all before is final already
            args = region[:self._brackets.advance(region)]
        else:  # a scalar (rare): ended by the object's last "}", known when the block is
            end = region.rfind("}") if complete else -1
            args = (region[:end] if end >= 0 else region if complete else "").rstrip()
        if len(args) > self._args_sent:
            call = self.calls[-1]
            call.arguments = args
            out.tool_calls.append(ToolCallDelta(len(self.calls) - 1, args[self._args_sent:]))
            self._args_sent = len(args)

    def _whole_block(self, out: ParsedDelta, body: str) -> None:
        """A complete block without the name-first prefix: a call if its body is {"name", "arguments"} JSON."""
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and "arguments" in obj):
            self._content.append(f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}")
            return
        args = obj["arguments"]
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        call = ToolCall(new_call_id(), obj["name"], args)
        self.calls.append(call)
        i = len(self.calls) - 1
        out.tool_calls += [ToolCallDelta(i, "", call.id, call.name), ToolCallDelta(i, args)]

    def _content_delta(self, final: bool) -> str:
        """New content to send: nothing while all content is whitespace (it is dropped if calls follow)."""
        text = "".join(self._content)
        if not text.strip() and not (final and not self.calls):
            return ""
        new = text[self._content_sent:]
        self._content_sent = len(text)
        return new


def parse_tool_calls(text: str, max_calls: int | None = None) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole output."""
    p = ToolCallParser(max_calls)
    p.feed(text)
    p.finish()
    return p.content, p.calls
