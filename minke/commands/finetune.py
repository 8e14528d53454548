"""`minke finetune`: DeepSeek's finetune/finetune.py on minke's own models, with that script's flags.

  minke finetune --model_name_or_path BASE --data_path data.jsonl --output_dir OUT [--use_lora True [--bits 4]] ...
  torchrun --nproc_per_node N -m minke.cli finetune ...      (several processes: FSDP2, see minke/train/distributed.py)
  minke finetune --merge ADAPTER_DIR --output_dir MERGED [--model_name_or_path BASE]

Full runs write an HF-format model to OUTPUT_DIR; LoRA/QLoRA runs write a PEFT adapter there (a bare `--merge`
also writes the merged model to OUTPUT_DIR/merged). Checkpoints go to OUTPUT_DIR/checkpoint-N and a rerun resumes
from the newest automatically.
"""

from __future__ import annotations

import argparse
import os

from ..train.args import add_bool, add_training_args


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("finetune", help="fine-tune a model (full, LoRA, QLoRA) with DeepSeek finetune.py's flags",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data (finetune.py's ModelArguments / DataArguments)")
    g.add_argument("--model_name_or_path", "--model", default=None, help="base checkpoint directory")
    g.add_argument("--data_path", default=None,
                   help="JSON lines, a JSON array or parquet (Open-Platypus) of {instruction, output [, input]} or "
                        "{messages}; a file, a directory or several")
    g.add_argument("--prompt_format", default="chat", choices=("chat", "instruction", "deepseek"),
                   help="chat: the model's chat template, answers end with eos (default); instruction: finetune.py's "
                        "### Instruction prompt, answers end with eos; deepseek: finetune.py's preprocessing exactly "
                        "(answers end with the text '\\n<|EOT|>', rows truncated, 'input' ignored)")
    g.add_argument("--long_rows", default=None, choices=("skip", "truncate"),
                   help="rows longer than --model_max_length: skip them (default) or cut them (default with "
                        "--prompt_format deepseek, as finetune.py); counted either way")
    g.add_argument("--input_field", default=None, choices=("append", "ignore"),
                   help="a row's optional 'input' (Alpaca, Open-Platypus): appended to the instruction (default) or "
                        "ignored (default with --prompt_format deepseek, as finetune.py); counted either way")
    add_bool(g, "use_lora", False, "train LoRA adapters on a frozen base instead of all weights")
    g.add_argument("--lora_r", "--lora_rank", dest="lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=float, default=32.0)
    g.add_argument("--lora_dropout", type=float, default=0.1)
    g.add_argument("--trainable", default="q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj",
                   help="LoRA target Linear modules (on MLA models the default adds the MLA projections)")
    g.add_argument("--modules_to_save", default="embed_tokens,lm_head",
                   help="modules trained in full beside the adapters ('' for none)")
    g.add_argument("--bits", type=int, default=16,
                   help="4 = QLoRA, 8 = 8-bit base (bitsandbytes, CUDA); 16 = LoRA or full")
    add_bool(g, "double_quant", True, "QLoRA: quantize the quantization constants too")
    g.add_argument("--quant_type", default="nf4", choices=("nf4", "fp4"))
    g.add_argument("--attn_implementation", default=None, help="accepted for compatibility; minke uses SDPA")
    g.add_argument("--merge", nargs="?", const=True, default=None, metavar="ADAPTER_DIR",
                   help="with a path: fold that adapter into its base and write OUTPUT_DIR; bare, after a LoRA run: "
                        "also write the merged model to OUTPUT_DIR/merged")
    add_training_args(p, max_length_default=512)
    return p


def run(args) -> int:
    try:
        return _run(args)
    except OSError as e:  # a disk or permission failure outside the checked writes: still one line
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{e.strerror or e} ({e.filename})" if e.filename else str(e)) from None


def _run(args) -> int:
    from ..train.finetune import merge_adapter

    if isinstance(args.merge, str):
        merge_adapter(args.merge, args.output_dir, base=args.model_name_or_path, bf16=args.bf16)
        return 0
    if not args.model_name_or_path or not args.data_path:
        raise ValueError("give --model_name_or_path and --data_path (or --merge ADAPTER_DIR)")
    if args.merge and not args.use_lora:
        raise ValueError("--merge folds LoRA adapters into the base: it needs --use_lora True")
    summary = finetune(args)
    info = summary["info"]
    if args.merge and info.is_main:
        merge_adapter(args.output_dir, os.path.join(args.output_dir, "merged"), base=args.model_name_or_path,
                      bf16=args.bf16)
    return 0


def finetune(args) -> dict:
    from ..config import load_config
    from ..tokenizer import Tokenizer
    from ..train.args import TrainingConfig
    from ..train.data import SFTData, SFTOptions, check_vocab, load_sft_dataset
    from ..train.finetune import LoraOptions, build_finetune_model
    from ..train.session import run_session

    cfg = TrainingConfig.from_args(args)
    sft = SFTOptions(args.prompt_format, args.long_rows, args.input_field)
    lora = LoraOptions(args.use_lora, args.lora_r, args.lora_alpha, args.lora_dropout, args.trainable,
                       args.modules_to_save, args.bits, args.double_quant, args.quant_type)
    base = args.model_name_or_path
    if not os.path.isdir(base):
        raise FileNotFoundError(f"--model_name_or_path {base}: no such directory")
    tokenizer = Tokenizer.from_dir(base)

    def setup(info, plan, resume, log):
        examples, _ = load_sft_dataset(args.data_path, tokenizer, cfg.model_max_length, sft, log=log)
        check_vocab(max(max(e.input_ids) for e in examples), load_config(base).vocab_size, base)
        model, writer = build_finetune_model(base, lora, cfg, info, plan, resume)
        return model, SFTData(examples, pad_id=tokenizer.eos_token_id), writer

    return run_session(cfg, quantized=lora.bits in (4, 8), setup=setup)
