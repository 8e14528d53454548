"""The Tokenizer of a DeepSeek checkpoint directory (SPEC §3): tokenizer.json through the `tokenizers` library,
tokenizer_config.json's special tokens and chat template.

- `encode(text)` prepends bos iff `add_bos_token` (tokenizer_config.json, default True), as DeepSeek's
  original `LlamaTokenizerFast` config does. The raw `tokenizer.json` post-processor is bypassed
  (`add_special_tokens=False` on the backend) and bos/eos are added here, so a tokenizer.json whose
  post-processor already adds bos (as transformers >= 5 writes it) never yields a double bos.
- `apply_chat_template` renders with chat_template.py and encodes the text WITHOUT adding bos again: the template
  writes `{{ bos_token }}` itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _BackendTokenizer

from . import tool_prompt

from .chat_template import (
    BUILTIN_CHAT_TEMPLATES,
    DEFAULT_CHAT_TEMPLATE_NAME,
    ChatTemplate,
    resolve_chat_template,
    template_from_config,
    validate_messages,
)

# Official DeepSeek special tokens: used when tokenizer_config.json does not name bos/eos at all.
DEFAULT_BOS_TOKEN = "<｜begin▁of▁sentence｜>"
DEFAULT_EOS_TOKEN = "<｜end▁of▁sentence｜>"

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


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


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
        self._compiled: dict[str, ChatTemplate] = {}  # by template source

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
                template = template_from_config(cfg.get("chat_template"), cfg_file)
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
    def backend(self) -> _BackendTokenizer:
        """The `tokenizers` Tokenizer of tokenizer.json (grammar engines read its vocabulary and its type)."""
        return self._backend

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
                    chat_template: str | None = None, tools: list[dict] | None = None) -> str:
        """The prompt text of `messages` (bos included, as the template writes it). `tools` (OpenAI's function
        tools) and tool use in the messages (assistant `tool_calls`, "tool" results) go to a template that has a
        tool section (one that reads `tools`) as they are; any other template renders them in minke's tool
        prompt (tool_prompt.py), written as plain system / user / assistant messages."""
        msgs = validate_messages(messages)
        source = resolve_chat_template(chat_template) if chat_template is not None else self.chat_template
        template = self._compiled.get(source)
        if template is None:
            template = self._compiled[source] = ChatTemplate(source)
        if tools or tool_prompt.uses_tools(msgs):
            if template.uses_tools:
                msgs = tool_prompt.for_tool_template(msgs)
            else:
                msgs, tools = tool_prompt.to_plain_messages(msgs, tools), None
        return template.render(msgs, add_generation_prompt, self._template_vars, tools=tools)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True, chat_template: str | None = None,
                            tools: list[dict] | None = None) -> list[int] | str:
        """Render `messages` (and `tools`, as transformers takes them) with the chat template; token ids
        (tokenize=True) or the text.

        The rendered text is encoded without add_special_tokens: the template already wrote bos, and
        encoding with it again would give a double bos (transformers does the same)."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, chat_template=chat_template,
                                tools=tools)
        if not tokenize:
            return text
        return self.encode(text, add_special_tokens=False)

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={self.eos_token_id}, add_bos_token={self.add_bos_token})")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a checkpoint directory (tokenizer.json + tokenizer_config.json)."""
    return Tokenizer.from_dir(path)
