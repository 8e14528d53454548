"""Tokenizer, chat templates and incremental detokenization for DeepSeek checkpoints (SPEC §3, §5).

Runtime dependencies are only the `tokenizers` library (byte-level BPE from `tokenizer.json`) and jinja2
(chat templates). transformers is not needed: tests use it as the oracle.

Behaviour that matters, and why:
- `encode(text)` prepends bos iff `add_bos_token` (tokenizer_config.json, default True), as DeepSeek's
  original `LlamaTokenizerFast` config does. The raw `tokenizer.json` post-processor is bypassed
  (`add_special_tokens=False` on the backend) and bos/eos are added here, so a tokenizer.json whose
  post-processor already adds bos (as transformers >= 5 writes it) never yields a double bos.
- Chat templates render exactly like transformers' `apply_chat_template` (sandboxed jinja2,
  trim_blocks, lstrip_blocks, `raise_exception`, special-token variables), and the rendered string is
  encoded WITHOUT adding bos again: the template writes `{{ bos_token }}` itself.
- `IncrementalDetokenizer` streams text without ever cutting a multi-byte character in half
  (the prefix/read offset method of vLLM and TGI).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _BackendTokenizer

# Official DeepSeek special tokens: used when tokenizer_config.json does not name bos/eos at all.
DEFAULT_BOS_TOKEN = "<｜begin▁of▁sentence｜>"
DEFAULT_EOS_TOKEN = "<｜end▁of▁sentence｜>"

# Built-in chat templates for checkpoints whose tokenizer_config.json has none (SPEC §3). They are the
# templates DeepSeek ships: "deepseek" with DeepSeek LLM / MoE / V2-Chat, "deepseek-v2-0628" with
# V2-Chat-0628. A system message renders as "{content}\n\n"; the generation prompt has no trailing space.
_DEEPSEEK_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% else %}{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_DEEPSEEK_V2_0628_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% else %}{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
BUILTIN_CHAT_TEMPLATES: dict[str, str] = {
    "deepseek": _DEEPSEEK_TEMPLATE,
    "deepseek-v2-0628": _DEEPSEEK_V2_0628_TEMPLATE,
}
DEFAULT_CHAT_TEMPLATE_NAME = "deepseek"

CHAT_ROLES = ("system", "user", "assistant")

# vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET: how many prompt tokens give the first output token
# its decoding context.
_PROMPT_CONTEXT_TOKENS = 5


# ----------------------------------------------------------------------------------------------------
# tokenizer_config.json helpers


def _token_content(value: Any, field: str, config_file: Path) -> str | None:
    """bos/eos entries are either a plain string or an AddedToken dict {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(
        f"{config_file}: field {field!r} must be a string or an object with a string 'content', got {value!r}"
    )


def _template_from_config(value: Any, config_file: Path) -> str | None:
    """`chat_template` is a string, or a list of {"name", "template"} from which "default" is used."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for i, entry in enumerate(value):
            if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise ValueError(
                    f"{config_file}: chat_template[{i}] must be an object with string 'name' and 'template'"
                )
            named[entry["name"]] = entry["template"]
        if "default" in named:
            return named["default"]
        if len(named) == 1:
            return next(iter(named.values()))
        raise ValueError(
            f"{config_file}: chat_template lists several templates {sorted(named)} but none is named 'default'"
        )
    raise ValueError(
        f"{config_file}: field 'chat_template' must be a string or a list, got {type(value).__name__}"
    )


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


# ----------------------------------------------------------------------------------------------------
# jinja2 environment, as transformers builds it (utils/chat_template_utils.py::_compile_jinja_template)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): render the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; transformers overrides it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse (line {e.lineno}): {e.message}") from e


def resolve_chat_template(spec: str) -> str:
    """A chat template given by the user: a built-in name, an inline jinja string, or a path to a file."""
    if not isinstance(spec, str):
        raise TypeError(
            f"chat_template must be a string (template, file path or built-in name), got {type(spec).__name__}"
        )
    if spec in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[spec]
    if "{{" in spec or "{%" in spec:
        return spec
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return f.read()
    raise ValueError(
        f"chat_template {spec!r} is neither a built-in name {sorted(BUILTIN_CHAT_TEMPLATES)}, "
        "a jinja template string, nor an existing file"
    )


def _validate_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise ValueError(f"messages[{i}] has no 'role'")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"messages[{i}] has unknown role {m['role']!r}; expected one of {list(CHAT_ROLES)}")
        if "content" not in m:
            raise ValueError(f"messages[{i}] ({m['role']}) has no 'content'")
        if not isinstance(m["content"], str):
            raise ValueError(
                f"messages[{i}] ({m['role']}) content must be a string, got {type(m['content']).__name__}"
            )
        out.append(dict(m))  # a copy: templates never see (or keep) the caller's objects
    return out


# ----------------------------------------------------------------------------------------------------


class Tokenizer:
    """Byte-level BPE tokenizer of a checkpoint directory, with its chat template."""

    def __init__(
        self,
        backend: _BackendTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        add_bos_token: bool,
        add_eos_token: bool,
        chat_template: str,
        model_max_length: int | None = None,
        extra_template_vars: Mapping[str, str] | None = None,
        source: str = "<memory>",
    ):
        self._backend = backend
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        if add_bos_token and self.bos_token_id is None:
            raise ValueError(
                f"{source}: add_bos_token is set but bos token {bos_token!r} is not in the vocabulary"
            )
        if add_eos_token and self.eos_token_id is None:
            raise ValueError(
                f"{source}: add_eos_token is set but eos token {eos_token!r} is not in the vocabulary"
            )
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.model_max_length = model_max_length
        # Total ids the tokenizer can produce, added tokens included (100002 for DeepSeek; the model's
        # embedding table is padded to 102400).
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self.chat_template = chat_template
        # Variables every template sees, as transformers' special_tokens_map (None tokens left out).
        self._template_vars = {"bos_token": bos_token, "eos_token": eos_token, **(extra_template_vars or {})}
        self._template_vars = {k: v for k, v in self._template_vars.items() if v is not None}
        self._compiled: dict[str, jinja2.Template] = {}

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike, chat_template: str | None = None) -> "Tokenizer":
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"tokenizer directory {str(root)!r} does not exist or is not a directory")
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file} not found: minke needs the checkpoint's tokenizer.json")
        try:
            backend = _BackendTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON / unknown components
            raise ValueError(f"{tok_file}: cannot be read as a tokenizers file ({e})") from e

        cfg_file = root / "tokenizer_config.json"
        cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")

        bos = _token_content(cfg["bos_token"], "bos_token", cfg_file) if "bos_token" in cfg else DEFAULT_BOS_TOKEN
        eos = _token_content(cfg["eos_token"], "eos_token", cfg_file) if "eos_token" in cfg else DEFAULT_EOS_TOKEN
        if "bos_token" not in cfg and backend.token_to_id(bos) is None:
            bos = None
        if "eos_token" not in cfg and backend.token_to_id(eos) is None:
            eos = None
        extra = {}
        for name in ("pad_token", "unk_token"):
            if name in cfg:
                extra[name] = _token_content(cfg[name], name, cfg_file)

        add_bos, add_eos = cls._special_token_policy(backend, cfg, cfg_file, bos, eos)

        if chat_template is not None:
            template = resolve_chat_template(chat_template)
        else:
            # transformers >= 5 saves the template beside the config as chat_template.jinja; it wins.
            jinja_file = root / "chat_template.jinja"
            if jinja_file.is_file():
                template = jinja_file.read_text(encoding="utf-8")
            else:
                template = _template_from_config(cfg.get("chat_template"), cfg_file)
            if template is None:
                template = BUILTIN_CHAT_TEMPLATES[DEFAULT_CHAT_TEMPLATE_NAME]

        max_len = cfg.get("model_max_length")
        if max_len is not None and not isinstance(max_len, (int, float)):
            raise ValueError(f"{cfg_file}: field 'model_max_length' must be a number, got {max_len!r}")
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            chat_template=template,
            model_max_length=int(max_len) if max_len is not None else None,
            extra_template_vars=extra,
            source=str(root),
        )

    @staticmethod
    def _special_token_policy(backend, cfg, cfg_file, bos, eos) -> tuple[bool, bool]:
        """Whether encode() adds bos / eos.

        tokenizer_config.json's add_bos_token / add_eos_token win. When absent (transformers >= 5 writes
        no such keys and bakes the rule into tokenizer.json's post-processor instead), follow what the
        post-processor adds; with no template post-processor at all, bos defaults to on (DeepSeek)."""
        for key in ("add_bos_token", "add_eos_token"):
            if key in cfg and not isinstance(cfg[key], bool):
                raise ValueError(f"{cfg_file}: field {key!r} must be true or false, got {cfg[key]!r}")
        with_pp = backend.encode("a", add_special_tokens=True).ids
        plain = backend.encode("a", add_special_tokens=False).ids
        pp_adds = with_pp != plain
        is_template = type(backend.post_processor).__name__ in ("TemplateProcessing", "Sequence")
        bos_id = backend.token_to_id(bos) if bos else None
        eos_id = backend.token_to_id(eos) if eos else None
        if pp_adds or is_template:
            pp_bos = bos_id is not None and with_pp[:1] == [bos_id]
            pp_eos = eos_id is not None and with_pp[-1:] == [eos_id]
        else:
            pp_bos, pp_eos = True, False
        add_bos = cfg.get("add_bos_token", pp_bos)
        add_eos = cfg.get("add_eos_token", pp_eos)
        if bos is None and "add_bos_token" not in cfg:
            add_bos = False
        return add_bos, add_eos

    # -- encode / decode ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings inside it (e.g. eos) map to their ids, as in
        transformers. With add_special_tokens, bos is prepended iff add_bos_token (eos appended iff
        add_eos_token)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos_token:
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token:
                ids = [*ids, self.eos_token_id]
        return ids

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        out = []
        for t in ids:
            t = int(t)  # accepts numpy / torch integer scalars
            if t < 0:
                raise ValueError(f"token id {t} is negative")
            out.append(t)
        return out

    @property
    def is_byte_level(self) -> bool:
        """Whether decode reads the tokens' concatenated bytes as UTF-8 (a ByteLevel decoder, as DeepSeek's)."""
        return type(self._backend.decoder).__name__ == "ByteLevel"

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Ids past the tokenizer's vocabulary (the model pads its vocab to 102400)
        decode to nothing, as in transformers and vLLM."""
        return self._backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int] | int) -> list[str]:
        """Byte-level token strings (e.g. 'Ġworld'). Raises ValueError for an id with no token."""
        if isinstance(ids, int):
            ids = [ids]
        out = []
        for t in self._check_ids(ids):
            tok = self._backend.id_to_token(t)
            if tok is None:
                raise ValueError(f"token id {t} is outside the tokenizer's vocabulary (size {self.vocab_size})")
            out.append(tok)
        return out

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        """True for special added tokens (bos, eos, ...): the ones decode(skip_special_tokens=True) drops."""
        return int(token_id) in self.special_ids

    # -- chat --------------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    chat_template: str | None = None) -> str:
        """The prompt text of `messages` (bos included, as the template writes it)."""
        msgs = _validate_messages(messages)
        source = resolve_chat_template(chat_template) if chat_template is not None else self.chat_template
        template = self._compiled.get(source)
        if template is None:
            template = self._compiled[source] = _compile_template(source)
        try:
            return template.render(
                messages=msgs,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._template_vars,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True, chat_template: str | None = None) -> list[int] | str:
        """Render `messages` with the chat template; token ids (tokenize=True) or the text.

        The rendered text is encoded without add_special_tokens: the template already wrote bos, and
        encoding with it again would give a double bos (transformers does the same)."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, chat_template=chat_template)
        if not tokenize:
            return text
        return self.encode(text, add_special_tokens=False)

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={self.eos_token_id}, add_bos_token={self.add_bos_token})")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a checkpoint directory (tokenizer.json + tokenizer_config.json)."""
    return Tokenizer.from_dir(path)


class IncrementalDetokenizer:
    """Streaming detokenization of one sequence.

    Byte-level BPE tokens can end in the middle of a UTF-8 character (an emoji is often 3-4 tokens),
    and decoding such a prefix gives U+FFFD. Like vLLM/TGI, decode a small window of ids twice:
    `ids[prefix_offset:read_offset]` (text already emitted) and `ids[prefix_offset:]`; emit the
    difference only when the longer one grew and does not end in U+FFFD, then slide the window.
    The window starts a few tokens back so each decode has context; it stays a handful of tokens
    long, so each step costs O(window), not O(sequence).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._decode = tokenizer._backend.decode  # ids are checked as they come in, not again per decode
        self._skip = skip_special_tokens
        # Only the prompt's last few tokens are ever decoded (the first window's context).
        prompt = list(prompt_ids or [])
        self._ids: list[int] = tokenizer._check_ids(prompt[max(len(prompt) - _PROMPT_CONTEXT_TOKENS, 0):])
        self._num_prompt = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""
        # decode(ids[prefix_offset:read_offset]) when known: unchanged while nothing is emitted, and after an
        # emission it is the emitted text itself when that was clean byte-level text (see _emit), so a typical
        # step decodes once, not twice.
        self._prefix_text: str | None = None
        self._byte_level = tokenizer.is_byte_level

    def _pending(self) -> tuple[str, str]:
        prefix_text = self._prefix_text
        if prefix_text is None:
            prefix_text = self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset],
                                                           skip_special_tokens=self._skip)
        new_text = self._decode(self._ids[self._prefix_offset:], skip_special_tokens=self._skip)
        return prefix_text, new_text

    def _emit(self, prefix_text: str, new_text: str) -> str:
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text += delta
        # The new window is the ids just emitted. A byte-level decode is the UTF-8 reading of the tokens'
        # concatenated bytes; with no U+FFFD in the old window or the whole, both cut points are character
        # boundaries, so decoding the new window alone gives exactly delta.
        clean = self._byte_level and "\ufffd" not in new_text and new_text.startswith(prefix_text)
        self._prefix_text = delta if clean else None
        return delta

    def step(self, new_token_ids: list[int]) -> str:
        """Add generated ids; return the text they complete ("" while a character is still partial)."""
        self._ids.extend(self._tok._check_ids(new_token_ids))
        prefix_text, new_text = self._pending()
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            return self._emit(prefix_text, new_text)
        return ""

    def flush(self) -> str:
        """At the end of the sequence: return any held-back text, even if it ends in U+FFFD (the
        model really produced an incomplete byte sequence)."""
        prefix_text, new_text = self._pending()
        if len(new_text) > len(prefix_text):
            return self._emit(prefix_text, new_text)
        return ""

    @property
    def text(self) -> str:
        """All output text emitted so far (prompt excluded)."""
        return self._text

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._num_prompt:]


def detokenize_output(tokenizer: Tokenizer, prompt_ids: Sequence[int], output_ids: Sequence[int],
                      skip_special_tokens: bool = True) -> str:
    """The text that IncrementalDetokenizer(tokenizer, prompt_ids).step([t]) for each t of output_ids would have
    emitted in total (no flush), computed at once: the engine's final_only requests detokenize at the end.

    Fast path, two decodes: with a byte-level decoder, decode(ids) is the lossy UTF-8 reading of the concatenated
    bytes of the tokens. When neither the prompt window nor the prompt window + all outputs decode to a U+FFFD,
    both ends are character boundaries, every held-back partial character was completed later, and the per-step
    emissions telescope to decode(window + outputs)[len(decode(window)):]. Otherwise (an incomplete or invalid byte
    sequence somewhere, or another decoder) replay the incremental steps, which is exact by construction."""
    prompt = [int(t) for t in prompt_ids[max(len(prompt_ids) - _PROMPT_CONTEXT_TOKENS, 0):]]
    out = [int(t) for t in output_ids]
    if not out:
        return ""
    if tokenizer.is_byte_level:
        prefix = tokenizer.decode(prompt, skip_special_tokens) if prompt else ""
        full = tokenizer.decode(prompt + out, skip_special_tokens)
        if "\ufffd" not in full and "\ufffd" not in prefix and full.startswith(prefix):
            return full[len(prefix):]
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    for t in out:
        detok.step([t])
    return detok.text
