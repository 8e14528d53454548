"""Train a small byte-level BPE tokenizer for a model trained from scratch, written as a checkpoint's tokenizer
files (tokenizer.json + tokenizer_config.json with DeepSeek's bos/eos names and chat template), so
`minke.tokenizer.Tokenizer.from_dir` and transformers load it like DeepSeek's own."""

from __future__ import annotations

import json
import os
from typing import Iterable

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
# DeepSeek LLM / V2-Chat's template (tokenizer_config.json of deepseek-llm-7b-chat).
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str, chat_template: str = CHAT_TEMPLATE,
                        model_max_length: int = 4096) -> str:
    """Byte-level BPE (every byte representable, so no unknown tokens) with bos = id 0, eos = id 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 260:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE (256 bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    cfg = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "add_bos_token": True, "add_eos_token": False,
           "model_max_length": model_max_length, "chat_template": chat_template,
           "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    return out_dir
