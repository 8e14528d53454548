"""Fine-tuning throughput and memory on a DeepSeek-V2-Lite-shaped model (random weights), minke against
transformers + PEFT on the same weights, same targets, same data, in the same process (as `minke bench` does for
inference).

The model has V2-Lite's real shapes (hidden 2048, 16 heads, MLA kv_lora_rank 512, 64 routed + 2 shared experts of
width 1408, top-6, vocab 102400, first layer dense 10944); --num_layers (default 27, the real depth) can shorten it.
Weights are drawn in memory (nothing is downloaded or written). Each case:

  minke           prepared as `minke finetune` prepares a loaded checkpoint (minke.train.quant / minke.train.lora)
                  and trained by minke.train.trainer.Trainer: routed experts as grouped GEMMs (train/moe_train.py),
                  chunked cross-entropy (train/loss.py);
  transformers    DeepseekV2ForCausalLM on the very same weight tensors (experts_implementation="grouped_mm"),
                  PEFT `get_peft_model` with the same LoraConfig minke wrote (its PEFT form: experts and MLP
                  Linears as target_parameters), bitsandbytes 4-bit Linear layers for QLoRA (what
                  `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))` does: transformers
                  quantizes Linear modules only, its stacked experts stay bf16), a plain loop: bf16 autocast,
                  AdamW, clip 0.3, gradient checkpointing (non-reentrant).

Cases (--cases, comma-separated):
  lora-attn   bf16 base, LoRA r 64 / alpha 16 on the attention projections
  lora-all    bf16 base, LoRA on every Linear but lm_head and on the routed experts ("all-linear")
  lora-default  bf16 base, finetune.py's default --trainable (attention, dense and shared-expert MLPs; routed
              experts frozen): what `--mode lora` of the earlier version of this script ran
  lora-peft-default  what PEFT makes of finetune.py's list on transformers 5's DeepseekV2: attention + the stacked
              routed experts (gate_up_proj at rank 2r / alpha 2a, down_proj at r), dense and shared MLPs untouched
  qlora-attn  4-bit nf4 base (double quant), LoRA on attention
  qlora-all   4-bit nf4 base, LoRA everywhere incl. experts
  full        full fine-tuning, fp32 master weights, bf16 autocast, AdamW (--full_layers, default 8 layers)

Printed: one JSON line per case and side (tokens/s over the timed steps, step time, peak GPU memory, loss first /
last step), then a table with the ratio minke / transformers per case.

  python bench/bench_finetune.py                       # all cases, 27 layers (full: 8), 4 x 1024 tokens
  python bench/bench_finetune.py --cases lora-attn --steps 8 --no_compare
  python bench/bench_finetune.py --cpu_smoke           # tiny shapes on the CPU, every case's code path

Needs torch with CUDA, transformers >= 5, peft >= 0.18 and (QLoRA) bitsandbytes. On a machine without network,
carry their wheels (pip download --no-deps peft bitsandbytes) and run with PYTHONPATH=. from the repo root.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minke.config import config_from_dict  # noqa: E402
from minke.loader import build_model  # noqa: E402
from minke.train.args import TrainingConfig  # noqa: E402
from minke.train.data import BlockData, GlobalBatchSampler  # noqa: E402
from minke.train.distributed import DistInfo, ShardPlan  # noqa: E402
from minke.train.lora import apply_lora, make_lora_config  # noqa: E402
from minke.train.pretrain import init_weights  # noqa: E402
from minke.train.trainer import Trainer  # noqa: E402

V2_LITE = dict(
    model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
    moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
    n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, routed_scaling_factor=1.0, topk_method="greedy",
    n_group=1, topk_group=1, norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True,
    first_k_dense_replace=1, moe_layer_freq=1, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    bos_token_id=100000, eos_token_id=100001, tie_word_embeddings=False, torch_dtype="bfloat16",
)
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=4096,
             rope_scaling=None, bos_token_id=0, eos_token_id=1)
ATTN = "q_proj,q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj"
DEFAULT = "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"  # finetune.py's list (minke: + MLA, no experts)
CASES = {  # name -> (base: bf16 | nf4 | full, --trainable)
    "lora-attn": ("bf16", ATTN), "lora-all": ("bf16", "all-linear"), "lora-default": ("bf16", DEFAULT),
    "lora-peft-default": ("bf16", "peft-default"),
    "qlora-attn": ("nf4", ATTN), "qlora-all": ("nf4", "all-linear"), "full": ("full", None),
}


def gib(n: float) -> float:
    return round(n / 1024**3, 2)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _base(raw: dict, base: str, device: torch.device) -> torch.nn.Module:
    """The random model every side of a case starts from (same seed, same device: the same weights)."""
    cfg = config_from_dict(raw, source="V2-Lite shapes")
    torch.manual_seed(0)
    dtype = torch.float32 if base == "full" else torch.bfloat16
    with torch.no_grad():
        model = init_weights(build_model(cfg, dtype, device))
    for p in model.parameters():
        p.requires_grad_(base == "full")
    return model


def _lora_targets(trainable: str, model) -> str:
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if trainable in ("all-linear", DEFAULT):
        return trainable
    return ",".join(t for t in trainable.split(",") if t in present)


class _StepProfiler:
    """--profile DIR: the last timed step of a side under torch.profiler; its kernel tables (by device time, and by
    input shape) are written to DIR/{side}-{case}.txt, so the two sides' steps can be compared op by op."""

    def __init__(self, args, side: str, case: str):
        self.dir, self.name, self.last = args.profile, f"{side}-{case}", args.steps + args.warmup - 1
        self.prof = None

    def start(self, i: int) -> None:
        if self.dir and i == self.last:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts, record_shapes=True)
            self.prof.__enter__()

    def stop(self) -> None:
        if self.prof is None:
            return
        self.prof.__exit__(None, None, None)
        os.makedirs(self.dir, exist_ok=True)
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        with open(os.path.join(self.dir, self.name + ".txt"), "w") as f:
            f.write(self.prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=90))
            f.write("\n\n# grouped by input shape\n")
            f.write(self.prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=40,
                                                                             max_name_column_width=60))
        self.prof = None


def _summary(side: str, case: str, raw: dict, args, steps: list[dict], setup_s: float, trainable: int,
             device: torch.device) -> dict:
    timed = steps[args.warmup:]
    dt = sum(s["step_time_s"] for s in timed)
    tok = args.batch_size * args.seq_len * len(timed)
    res = {"case": case, "side": side, "num_layers": raw["num_hidden_layers"], "seq_len": args.seq_len,
           "batch_size": args.batch_size, "timed_steps": len(timed), "tokens_per_s": round(tok / dt, 1),
           "step_time_s": round(dt / len(timed), 3), "setup_s": round(setup_s, 1), "trainable_params": trainable,
           "loss_first": round(steps[0]["loss"], 4), "loss_last": round(steps[-1]["loss"], 4),
           "finite": all(math.isfinite(s["loss"]) for s in steps)}
    if args.text:  # the curve: the token-mean cross-entropy of every step (minke's loss adds the balance loss)
        res["ce_curve"] = [round(s.get("ce_loss", s["loss"]), 4) for s in steps]
    if device.type == "cuda":
        res["gpu_peak_gib"] = gib(torch.cuda.max_memory_allocated())
    return res


# ------------------------------------------------------------------------------------------------------ minke
def run_minke(case: str, raw: dict, device: torch.device, args, data: torch.Tensor):
    """Returns (result, base state dict for the transformers side, the LoraConfig in its PEFT form or None)."""
    base, trainable = CASES[case]
    _reset_memory(device)
    t0 = time.perf_counter()
    model = _base(raw, base, device)
    # Tensors of the unprepared base, shared with the transformers model (LoRA leaves them untouched, so nothing is
    # held twice). The 4-bit base replaces its modules: keeping the bf16 originals alive for transformers would count
    # ~31 GiB of them in minke's peak, so that side draws the same weights again afterwards, as full fine-tuning does.
    shared = dict(model.state_dict()) if args.compare and base == "bf16" else None
    lora = None
    if base == "nf4":
        from minke.train.quant import quantize_model_4bit

        model = quantize_model_4bit(model, device, torch.bfloat16, "nf4", double_quant=True)
    if trainable == "peft-default":
        from peft import LoraConfig

        r, a = args.lora_r, args.lora_alpha
        lora = LoraConfig(r=r, lora_alpha=a, lora_dropout=0.0, target_modules=_lora_targets(ATTN, model).split(","),
                          target_parameters=["gate_up_proj", "down_proj"], rank_pattern={r".*\.gate_up_proj": 2 * r},
                          alpha_pattern={r".*\.gate_up_proj": 2 * a}, task_type="CAUSAL_LM")
        apply_lora(model, lora)
    elif base != "full":
        lora = make_lora_config(model, args.lora_r, args.lora_alpha, 0.0, _lora_targets(trainable, model),
                                modules_to_save="")
        apply_lora(model, lora)
    model.gradient_checkpointing = True
    setup_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainingConfig(output_dir=out, max_steps=args.steps + args.warmup,
                             per_device_train_batch_size=args.batch_size, learning_rate=2e-4 if lora else 2e-5,
                             max_grad_norm=0.3, bf16=True, save_strategy="no", gradient_checkpointing=True,
                             lr_scheduler_type="constant", weight_decay=0.0,  # as the transformers loop below
                             disable_tqdm=True, seed=0, cuda_graphs=args.cuda_graphs)
        trainer = Trainer(model, BlockData(data), cfg, DistInfo(device=device), ShardPlan("none"), writer=None)
        model.train()
        _reset_memory(device)
        steps = []
        prof = _StepProfiler(args, "minke", case)
        for i in range(args.steps + args.warmup):
            _sync(device)
            prof.start(i)
            m = trainer.train_step()
            _sync(device)
            prof.stop()
            steps.append(m)
    res = _summary("minke", case, raw, args, steps, setup_s, sum(p.numel() for p in trainer.trainable), device)
    del trainer, model
    _reset_memory(device)
    if shared is None and args.compare:  # full / 4-bit: the transformers side draws the same weights again
        shared = dict(_base(raw, base, device).state_dict())
    return res, shared, lora


# ------------------------------------------------------------------------------------------------ transformers
def hf_model(raw: dict, state: dict, device: torch.device, experts_impl: str):
    """transformers' DeepseekV2ForCausalLM whose parameters ARE the tensors of `state` (minke's names equal the HF
    ones, the stacked experts included)."""
    import transformers

    hf_cfg = transformers.DeepseekV2Config(**{k: v for k, v in raw.items() if k != "model_type"})
    with torch.device("meta"):
        hf = transformers.DeepseekV2ForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if [k for k in missing if "rotary" not in k] or unexpected:
        raise RuntimeError(f"weight sharing failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.device(device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg)
    hf.set_experts_implementation(experts_impl)
    return hf


def _hf_quantize_linears(hf, device):
    """As transformers' bnb 4-bit quantizer: every nn.Linear but lm_head -> bnb Linear4bit (nf4, double quant,
    bf16 compute); the stacked experts are not Linear modules and stay bf16."""
    import bitsandbytes as bnb

    for name, m in list(hf.named_modules()):
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(m.weight.detach().to(torch.bfloat16).cpu(), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
            hf.set_submodule(name, q.to(device))
    return hf


def run_transformers(case: str, raw: dict, device: torch.device, args, data: torch.Tensor, state: dict, lora):
    from peft import get_peft_model

    base, _ = CASES[case]
    _reset_memory(device)
    t0 = time.perf_counter()
    impl = args.hf_experts
    hf = hf_model(raw, state, device, impl)
    del state
    if base == "nf4":
        hf = _hf_quantize_linears(hf, device)
    for p in hf.parameters():
        p.requires_grad_(base == "full")
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        hf = get_peft_model(hf, lora)
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4 if lora is not None else 2e-5, weight_decay=0.0)  # minke's defaults
    setup_s = time.perf_counter() - t0
    _reset_memory(device)
    steps = []
    prof = _StepProfiler(args, "transformers", case)
    # The blocks in the order minke's Trainer takes them (its seeded sampler), so both sides see the same batches.
    sampler = GlobalBatchSampler(len(data), args.batch_size, 1, 1, 0)
    for i in range(args.steps + args.warmup):
        ids = data[sampler.micro_batches(i, 0)[0]].to(device)
        _sync(device)
        prof.start(i)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = hf(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        steps.append({"loss": loss.item(), "ce_loss": loss.item(), "step_time_s": time.perf_counter() - t})
        prof.stop()
    res = _summary("transformers", case, raw, args, steps, setup_s, sum(p.numel() for p in params), device)
    res["experts_implementation"] = impl
    del hf, opt, params
    return res


# -------------------------------------------------------------------------------------------------------- main
def _text_blocks(args, n_blocks: int, vocab: int) -> torch.Tensor:
    """--text: real text (the given files, concatenated) tokenized with --tokenizer into [n_blocks, seq_len] blocks
    (cycled when the text is shorter)."""
    import glob

    from minke.tokenizer import load_tokenizer

    files = sorted(f for pat in args.text.split(",") for f in glob.glob(pat, recursive=True))
    if not files:
        raise SystemExit(f"bench_finetune: --text {args.text!r} matches no file")
    tok = load_tokenizer(args.tokenizer)
    ids = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            ids += tok.encode(fh.read())
    ids = torch.tensor(ids, dtype=torch.long) % vocab
    need = n_blocks * args.seq_len
    ids = ids.repeat(need // ids.numel() + 1)[:need]
    print(json.dumps({"text_files": len(files), "text_tokens": int(min(need, ids.numel()))}), flush=True)
    return ids.view(n_blocks, args.seq_len)


def _curve_table(rows: list[dict]) -> str:
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        m = next((r for r in rows if r["case"] == case and r["side"] == "minke" and "ce_curve" in r), None)
        h = next((r for r in rows if r["case"] == case and r["side"] == "transformers" and "ce_curve" in r), None)
        if not (m and h):
            continue
        d = [abs(a - b) for a, b in zip(m["ce_curve"], h["ce_curve"])]
        out.append(f"{case}: cross-entropy per step, minke {m['ce_curve'][0]} -> {m['ce_curve'][-1]}, transformers "
                   f"{h['ce_curve'][0]} -> {h['ce_curve'][-1]}; |difference| mean {sum(d) / len(d):.4f}, max "
                   f"{max(d):.4f} over {len(d)} steps")
    return "\n".join(out)


def _table(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["case"], {})[r.get("side", "minke")] = r
    lines = [f"{'case':<12} {'layers':>6} {'minke tok/s':>12} {'hf+peft tok/s':>14} {'ratio':>6} "
             f"{'minke GiB':>10} {'hf GiB':>7}"]
    for case, sides in by.items():
        m, h = sides.get("minke", {}), sides.get("transformers", {})
        mt, ht = m.get("tokens_per_s"), h.get("tokens_per_s")
        ratio = f"{mt / ht:.2f}" if mt and ht else "-"
        layers = m.get("num_layers", h.get("num_layers", "-"))
        lines.append(f"{case:<12} {layers:>6} {mt or m.get('error', '-')!s:>12} {ht or h.get('error', '-')!s:>14} "
                     f"{ratio:>6} {m.get('gpu_peak_gib', '-')!s:>10} {h.get('gpu_peak_gib', '-')!s:>7}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="lora-attn,lora-all,qlora-attn,full", help=f"of {sorted(CASES)}")
    p.add_argument("--mode", choices=("lora", "qlora", "both"), default=None,
                   help="the earlier interface: lora = --cases lora-default, qlora = qlora-attn, both = the two")
    p.add_argument("--num_layers", type=int, default=27, help="decoder layers (V2-Lite has 27)")
    p.add_argument("--full_layers", type=int, default=8, help="decoder layers of the full fine-tuning case")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--lora_r", type=int, default=64, help="the README's QLoRA recipe: r 64, alpha 16")
    p.add_argument("--lora_alpha", type=float, default=16)
    p.add_argument("--no_compare", dest="compare", action="store_false", help="minke only")
    p.add_argument("--hf_experts", default="grouped_mm", help="transformers' experts_implementation")
    p.add_argument("--cpu_smoke", action="store_true", help="tiny shapes on the CPU: checks the script")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--text", default=None, metavar="GLOBS",
                   help="train on real text (comma-separated globs, e.g. 'README.md,minke/**/*.py') tokenized with "
                        "--tokenizer instead of random tokens, and print both sides' per-step loss curves")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for --text (e.g. the DeepSeek tokenizer)")
    p.add_argument("--no_cuda_graphs", dest="cuda_graphs", action="store_false",
                   help="minke's steps eagerly (default: replayed as CUDA graphs, as `minke finetune` does)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="profile the last step of each side; kernel tables go to DIR")
    args = p.parse_args()

    if args.mode:
        args.cases = {"lora": "lora-default", "qlora": "qlora-attn", "both": "qlora-attn,lora-default"}[args.mode]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        p.error(f"unknown --cases {bad}; choose from {sorted(CASES)}")
    if args.cpu_smoke:
        device = torch.device("cpu")
        args.seq_len, args.batch_size, args.steps, args.warmup = min(args.seq_len, 32), 2, 2, 1
        cases = [c for c in cases if not c.startswith("qlora")]  # bitsandbytes' 4-bit training needs CUDA
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("bench_finetune: needs a CUDA GPU (or --cpu_smoke)", file=sys.stderr)
        return 1
    else:
        device = torch.device("cuda", 0)
    rows = []
    versions = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                else "cpu"}
    for mod in ("transformers", "peft", "bitsandbytes"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    print(json.dumps({"versions": versions}), flush=True)
    for case in cases:
        layers = args.full_layers if case == "full" else args.num_layers
        raw = dict(V2_LITE, **(SMOKE if args.cpu_smoke else {"num_hidden_layers": layers}))
        n_blocks = args.batch_size * (args.steps + args.warmup)
        if args.text:
            data = _text_blocks(args, n_blocks, raw["vocab_size"])
        else:
            data = torch.randint(0, raw["vocab_size"], (n_blocks, args.seq_len),
                                 generator=torch.Generator().manual_seed(1))
        results = []
        state = lora = None
        try:
            res, state, lora = run_minke(case, raw, device, args, data)
        except torch.OutOfMemoryError as e:
            res = {"case": case, "side": "minke", "error": f"OOM: {str(e).splitlines()[0][:80]}"}
        except Exception as e:  # one failing case must not cost the others' numbers
            traceback.print_exc()
            res = {"case": case, "side": "minke", "error": f"{type(e).__name__}: {e}"[:200]}
        results.append(res)
        if args.compare and state is not None:
            try:
                results.append(run_transformers(case, raw, device, args, data, state, lora))
            except Exception as e:
                # e.g. an experts_implementation without a kernel for this dtype: once more with the eager loop,
                # the first error kept; a second failure is reported in the table (the minke side still stands)
                first = f"{type(e).__name__}: {e}"[:200]
                try:
                    hf_args = argparse.Namespace(**{**vars(args), "hf_experts": "eager"})
                    results.append({**run_transformers(case, raw, device, hf_args, data, state, lora),
                                    "first_error": first})
                except Exception as e2:
                    results.append({"case": case, "side": "transformers", "error": first,
                                    "eager_error": f"{type(e2).__name__}: {e2}"[:200]})
        del state
        for r in results:
            line = json.dumps(r)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
        rows += results
    print(_table(rows), flush=True)
    if args.text:
        print(_curve_table(rows), flush=True)
    return 0 if all("error" not in r for r in rows if r["side"] == "minke") else 1


if __name__ == "__main__":
    sys.exit(main())
