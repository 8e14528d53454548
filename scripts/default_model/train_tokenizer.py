"""Train the byte-level BPE tokenizer of minke's embedded default model (SPEC §3).

Same kind of tokenizer as DeepSeek's: byte-level BPE through the `tokenizers` library, bos
`<｜begin▁of▁sentence｜>` prepended (add_bos_token), eos `<｜end▁of▁sentence｜>` ending each assistant turn, and
DeepSeek's chat template (`<bos>{system}\\n\\nUser: {u}\\n\\nAssistant: {a}<eos>User: ...`) in
tokenizer_config.json. Only the vocabulary is smaller (4096 by default) and learned from the default model's own
corpus, so its embedding and output matrices stay small enough to ship.

Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json to --out_dir. bos is id 0, eos id 1.

Usage: python scripts/default_model/train_tokenizer.py --data_dir build/default_model/data --out_dir DIR
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from minke.tokenizer import BUILTIN_CHAT_TEMPLATES, DEFAULT_BOS_TOKEN, DEFAULT_EOS_TOKEN

DATA_FILES = ("pretrain.jsonl", "sft.jsonl")


def iter_texts(data_dir: Path) -> Iterator[str]:
    """Every text the model will see: pretraining paragraphs, and both sides of the dialogues together with the
    chat template's own words ("User:", "Assistant:") so they become single tokens."""
    for name in DATA_FILES:
        path = data_dir / name
        if not path.is_file():
            raise SystemExit(f"{path} not found: run scripts/default_model/prepare_data.py first")
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                row = json.loads(line)
                if "text" in row:
                    yield row["text"]
                elif "instruction" in row and "output" in row:
                    yield f"User: {row['instruction']}\n\nAssistant: {row['output']}"
                else:
                    raise SystemExit(f"{path}:{line_no}: expected a 'text' or 'instruction'/'output' object")


def build_tokenizer(texts: Iterator[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # GPT-2 style: split on the byte-level regex (words with their leading space, numbers, punctuation runs), no
    # prefix space so "Assistant:" + " reply" tokenizes the same in a prompt as in training.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[DEFAULT_BOS_TOKEN, DEFAULT_EOS_TOKEN],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any input text is encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(DEFAULT_BOS_TOKEN)
    # transformers' fast tokenizer adds bos through the post-processor; minke adds it itself from add_bos_token
    # and ignores this, so both give one bos.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{DEFAULT_BOS_TOKEN} $A", pair=f"{DEFAULT_BOS_TOKEN} $A {DEFAULT_BOS_TOKEN} $B",
        special_tokens=[(DEFAULT_BOS_TOKEN, bos_id)],
    )
    return tok


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json in the shape DeepSeek's chat checkpoints use (bos/eos as AddedToken objects, pad =
    eos), with their chat template."""

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False}

    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added(DEFAULT_BOS_TOKEN),
        "eos_token": added(DEFAULT_EOS_TOKEN),
        "pad_token": added(DEFAULT_EOS_TOKEN),
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": BUILTIN_CHAT_TEMPLATES["deepseek"],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", type=Path, required=True, help="prepare_data.py's output directory")
    ap.add_argument("--out_dir", type=Path, required=True)
    ap.add_argument("--vocab_size", type=int, default=4096)
    ap.add_argument("--min_frequency", type=int, default=2)
    ap.add_argument("--model_max_length", type=int, default=1024)
    a = ap.parse_args(argv)
    if a.vocab_size < 300:
        raise SystemExit(f"--vocab_size {a.vocab_size} is too small: byte-level BPE needs 256 bytes + 2 specials")
    tok = build_tokenizer(iter_texts(a.data_dir), a.vocab_size, a.min_frequency)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(a.out_dir / "tokenizer.json"))
    (a.out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(a.model_max_length), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    special = {"bos_token": DEFAULT_BOS_TOKEN, "eos_token": DEFAULT_EOS_TOKEN, "pad_token": DEFAULT_EOS_TOKEN}
    (a.out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n",
                                                       encoding="utf-8")
    sample = "Once upon a time, Emma walked to the garden."
    print(json.dumps({"vocab_size": tok.get_vocab_size(), "bos_id": tok.token_to_id(DEFAULT_BOS_TOKEN),
                      "eos_id": tok.token_to_id(DEFAULT_EOS_TOKEN),
                      "sample": tok.encode(sample, add_special_tokens=False).tokens}, ensure_ascii=False))


if __name__ == "__main__":
    main()
