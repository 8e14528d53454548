"""`minke train`: pretrain a model from scratch (default: a small deepseek_v2, MLA + MoE) on a text corpus, with
the same loop, flags, checkpoints and outputs as `minke finetune`.

  minke train --tokenizer_name TOKENIZER_DIR --data_path corpus/ --output_dir OUT \\
      [--config_name deepseek_v2-nano | config.json] [--config_overrides hidden_size=128,num_hidden_layers=2]
  torchrun --nproc_per_node N -m minke.cli train ...

The corpus: .txt files (one document each, or split on --doc_separator) or JSON lines with a text field. Documents
are packed into blocks of --model_max_length tokens. OUTPUT_DIR ends up an HF-format model directory.
"""

from __future__ import annotations

import argparse

from ..train.args import add_training_args


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="pretrain a small model from scratch on a text corpus",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data (transformers run_clm.py names)")
    g.add_argument("--config_name", default=None,
                   help="a preset (deepseek_v2-nano, deepseek_v2-micro) or a config.json / checkpoint directory")
    g.add_argument("--config_overrides", default=None, help="key=value,... applied to the config")
    g.add_argument("--tokenizer_name", default=None, help="directory with tokenizer.json (+ tokenizer_config.json)")
    g.add_argument("--model_name_or_path", default=None,
                   help="continue pretraining this checkpoint instead of starting from random weights")
    g.add_argument("--data_path", nargs="+", default=None, help="corpus files or directories")
    g.add_argument("--text_field", default="text", help="the text field of JSON rows")
    g.add_argument("--doc_separator", default=None,
                   help="split .txt files into documents on this string (e.g. '<|endoftext|>'; default: one per file)")
    add_training_args(p, max_length_default=512)
    # The balance loss averaged over the global batch: pretraining has no reference recipe to match, and the mean
    # keeps the loss independent of how the batch is split.
    p.set_defaults(learning_rate=3e-4, warmup_ratio=0.01, lr_scheduler_type="cosine", weight_decay=0.1,
                   balance_loss_weighting="global_batch")
    return p


def run(args) -> int:
    try:
        pretrain(args)
    except OSError as e:  # a disk or permission failure outside the checked writes: still one line
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{e.strerror or e} ({e.filename})" if e.filename else str(e)) from None
    return 0


def pretrain(args) -> dict:
    import torch

    from ..config import load_config
    from ..loader import build_model, load_model
    from ..tokenizer import Tokenizer
    from ..train.args import TrainingConfig
    from ..train.data import BlockData, check_vocab, load_pretrain_blocks
    from ..train.finetune import read_config_raw
    from ..train.pretrain import build_config, init_weights, parse_overrides, pretrain_config
    from ..train.session import run_session
    from ..train.writers import FullModelWriter

    if not args.data_path:
        raise ValueError("give --data_path (corpus files or directories)")
    cfg = TrainingConfig.from_args(args)
    tok_dir = args.tokenizer_name or args.model_name_or_path
    if not tok_dir:
        raise ValueError("give --tokenizer_name DIR (a directory with tokenizer.json)")
    tokenizer = Tokenizer.from_dir(tok_dir)
    if args.model_name_or_path:
        if args.config_name or args.config_overrides:
            raise ValueError("--model_name_or_path continues a checkpoint: drop --config_name/--config_overrides")
        raw = read_config_raw(args.model_name_or_path)
    else:
        raw = pretrain_config(args.config_name, parse_overrides(args.config_overrides), tokenizer)
    model_cfg = build_config(raw)

    def setup(info, plan, resume, log):
        blocks = load_pretrain_blocks(args.data_path, tokenizer, cfg.model_max_length, args.text_field,
                                      args.doc_separator, log=log)
        check_vocab(int(blocks.max()), model_cfg.vocab_size, "the model config")
        device = "cpu" if plan.strategy == "fsdp" else info.device
        source = resume or args.model_name_or_path
        if source:
            model = load_model(source, dtype=torch.float32, device=device, config=load_config(source),
                               progress=info.is_main)
        else:
            # Same seed on every rank: identical initial weights before FSDP shards them.
            model = build_model(model_cfg, torch.float32, device)
            init_weights(model, std=raw.get("initializer_range", 0.02),
                         generator=torch.Generator(device=device).manual_seed(cfg.seed))
            n = sum(p.numel() for p in model.parameters())
            log(f"model: {raw['model_type']} {n / 1e6:.2f}M parameters, {model_cfg.num_hidden_layers} layers, "
                f"hidden {model_cfg.hidden_size}, vocab {model_cfg.vocab_size}")
        model.gradient_checkpointing = cfg.gradient_checkpointing
        writer = FullModelWriter(model, raw, torch.bfloat16 if cfg.bf16 else torch.float32, tokenizer_dir=tok_dir,
                                 source_dir=args.model_name_or_path)
        return model, BlockData(blocks), writer

    return run_session(cfg, quantized=False, setup=setup)
