"""Tokenizer, chat templates and incremental detokenization for DeepSeek checkpoints (SPEC §3, §5).

Runtime dependencies are only the `tokenizers` library (byte-level BPE from `tokenizer.json`) and jinja2
(chat templates). transformers is not needed: tests use it as the oracle.

    tokenizer.py      Tokenizer (encode / decode / apply_chat_template), load_tokenizer
    chat_template.py  DeepSeek's built-in templates; rendering exactly like transformers' apply_chat_template
                      (sandboxed jinja2, trim_blocks, lstrip_blocks, `raise_exception`, special-token variables)
    tool_prompt.py    the tool prompt for templates without a tool section (tools in the system message, calls as
                      <tool_call> blocks, results as <tool_response> user turns)
    detokenizer.py    IncrementalDetokenizer (streams text without cutting a multi-byte character in half, the
                      prefix / read offset method of vLLM and TGI), detokenize_output (the same text at once)
"""

from .chat_template import BUILTIN_CHAT_TEMPLATES, CHAT_ROLES, DEFAULT_CHAT_TEMPLATE_NAME, resolve_chat_template
from .detokenizer import IncrementalDetokenizer, detokenize_output
from .tokenizer import DEFAULT_BOS_TOKEN, DEFAULT_EOS_TOKEN, Tokenizer, load_tokenizer

__all__ = [
    "BUILTIN_CHAT_TEMPLATES",
    "CHAT_ROLES",
    "DEFAULT_BOS_TOKEN",
    "DEFAULT_CHAT_TEMPLATE_NAME",
    "DEFAULT_EOS_TOKEN",
    "IncrementalDetokenizer",
    "Tokenizer",
    "detokenize_output",
    "load_tokenizer",
    "resolve_chat_template",
]
