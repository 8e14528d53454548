"""The training loop shared by `minke finetune` (full, LoRA, QLoRA) and `minke train` (from scratch).

One optimizer step = a global batch of per_device_batch x accumulation x world examples. The loss is

    L = sum of token cross-entropies over the global batch / number of target tokens in the global batch
        + w * sum over micro-batches of the MoE balance loss (aux_loss_alpha, per sequence when seq_aux),
          averaged over processes

with w = 1 (`--balance_loss_weighting micro_batch`, finetune's default: what DeepSeek's modeling code does under HF
Trainer, where AddAuxiliaryLoss gives every micro-batch's balance loss gradient 1 whatever the accumulation) or
w = 1 / accumulation (`global_batch`, pretraining's default: the mean). The cross-entropy part does not depend on
how the global batch is split into micro-batches or processes: the target token count is all-reduced before the
backward passes, and each rank's loss is scaled by the world size because FSDP/DDP average gradients across ranks.
One process and N processes with the same global batch therefore follow the same loss curve
(tests/test_train_distributed.py), and a resumed run continues its curve exactly.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .args import TrainingConfig
from .data import IGNORE_INDEX, GlobalBatchSampler
from .loss import chunked_cross_entropy
from .fused_attention import use_fused_attention
from .fused_mlp import use_fused_mlps
from .fused_norm import use_fused_norms
from .lora_linear import fuse_lora_linears
from .moe_train import use_grouped_experts
from .distributed import (DistInfo, ShardPlan, all_reduce_sum, full_model_state, full_optimizer_state, grad_sync,
                          load_full_optimizer_state)
from .deepspeed_config import deepspeed_lr, resolve_schedule
from .graphed_step import GraphedStep, graph_unavailable_reason
from .metrics import RunLogger
from .optim import build_optimizer, build_scheduler


class Trainer:
    def __init__(self, model: nn.Module, data, cfg: TrainingConfig, info: DistInfo, plan: ShardPlan, writer,
                 resume_from: str | None = None, log=print, deepspeed=None):
        """`model`: on info.device, already wrapped by distributed.wrap_model; `data`: SFTData or BlockData;
        `writer`: writers.FullModelWriter or AdapterWriter; `deepspeed`: deepspeed_config.DeepSpeedSettings whose
        optimizer / scheduler sections (if any) replace --optim / --lr_scheduler_type."""
        self.model, self.data, self.cfg, self.info, self.plan, self.writer = model, data, cfg, info, plan, writer
        self.resume_from, self.log = resume_from, log
        lengths = data.lengths() if cfg.group_by_length else None
        self.sampler = GlobalBatchSampler(len(data), cfg.per_device_train_batch_size,
                                          cfg.gradient_accumulation_steps, info.world,
                                          cfg.seed if cfg.data_seed is None else cfg.data_seed, lengths=lengths)
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.num_train_epochs * self.sampler.steps_per_epoch))
        if cfg.fp16 and plan.strategy == "fsdp":
            raise ValueError("--fp16 with FSDP2 (several processes, or CPU offload) is not supported (no loss scaler "
                             "for sharded parameters here): use --bf16, or a DeepSpeed ZeRO-0 config (DDP)")
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        use_grouped_experts(model)  # routed experts as grouped GEMMs (train/moe_train.py), not a per-expert loop
        fuse_lora_linears(model)  # PEFT's LoRA Linears as one autograd node each (train/lora_linear.py)
        use_fused_norms(model)  # RMSNorm forward + backward as Triton kernels on CUDA (train/fused_norm.py)
        use_fused_attention(model)  # MLA's q/k/v rope + assembly as one kernel each way (train/fused_attention.py)
        use_fused_mlps(model)  # dense / shared-expert SwiGLU as one kernel each way (train/fused_mlp.py)
        if deepspeed is not None and deepspeed.optimizer is not None:
            o = deepspeed.optimizer  # DeepSpeed's AdamW: one group, decay on every trainable parameter
            self.optimizer = torch.optim.AdamW(self.trainable, lr=o["lr"], betas=o["betas"], eps=o["eps"],
                                               weight_decay=o["weight_decay"])
        else:
            self.optimizer = build_optimizer(model, cfg, info.device)
        if deepspeed is not None and deepspeed.scheduler is not None:
            warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.total_steps)
            sched = resolve_schedule(deepspeed.scheduler, self.total_steps, warmup)
            base = self.optimizer.param_groups[0]["lr"]
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda s: deepspeed_lr(sched, s) / base if base > 0 else 0.0)
            log(f"schedule: DeepSpeed {sched['type']}, warm-up {sched['warmup_num_steps']} steps "
                f"({sched['warmup_type']}); lr at steps 1-3: "
                + ", ".join(f"{deepspeed_lr(sched, k):.3g}" for k in range(3)))
        else:
            self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        # float16 needs a loss scale (its range ends at 65504); bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(info.device.type) if cfg.fp16 else None
        self.aux_weight = 1.0 if cfg.balance_loss_weighting == "micro_batch" else 1.0 / cfg.gradient_accumulation_steps
        self.step = 0
        self.history: list[dict] = []
        # torch.utils.checkpoint must replay the RNG only when the forward draws random numbers (LoRA dropout);
        # not saving it is cheaper and keeps the step capturable.
        self.random_forward = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
        if hasattr(model, "checkpoint_rng"):
            model.checkpoint_rng = self.random_forward
        self.graphed = None
        if cfg.cuda_graphs:
            why = graph_unavailable_reason(info.device, plan.strategy != "none", self.scaler is not None)
            if why is None:
                self.graphed = GraphedStep(self._device_step, self.optimizer, info.device, log)
            elif info.device.type == "cuda":
                log(f"notice: cuda graphs off: {why}")

    # -- helpers ---------------------------------------------------------------------------------------------

    def _autocast(self):
        # FSDP2 casts parameters itself (MixedPrecisionPolicy); elsewhere bf16 runs under autocast with fp32
        # master weights (full fine-tuning) or fp32 adapters on a bf16 / 4-bit base (LoRA, QLoRA).
        if self.cfg.bf16 and self.plan.strategy != "fsdp":
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        if self.cfg.fp16:
            return torch.autocast(self.info.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def _trainer_state(self) -> dict:
        return {"global_step": self.step, "epoch": self.step / self.sampler.steps_per_epoch,
                "max_steps": self.total_steps, "global_batch_size": self.sampler.global_batch,
                "world_size": self.info.world, "seed": self.cfg.seed, "log_history": self.history}

    def _resume(self) -> None:
        state = ckpt.load_checkpoint(self.resume_from, self.info)
        ts = state["trainer_state"]
        if ts.get("global_batch_size") != self.sampler.global_batch or ts.get("seed") != self.cfg.seed:
            self.log(f"warning: {self.resume_from} was trained with global batch {ts.get('global_batch_size')} and "
                     f"seed {ts.get('seed')}; now {self.sampler.global_batch} and {self.cfg.seed}: the data order "
                     "differs from an uninterrupted run")
        load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.step = int(ts["global_step"])
        self.history = list(ts.get("log_history", []))
        self.log(f"resumed from {self.resume_from} at step {self.step}")

    def _save(self, out_dir: str | None = None) -> None:
        """A checkpoint-N (out_dir None) or the final output (out_dir = output_dir). Collective."""
        state = full_model_state(self.model, self.info, trainable_only=self.writer.trainable_only)
        if out_dir is None:
            extra = {"scaler.pt": self.scaler.state_dict()} if self.scaler is not None else None
            ckpt.save_checkpoint(self.cfg.output_dir, self.step, self.info,
                                 lambda d: self.writer.write(d, state, final=False),
                                 full_optimizer_state(self.model, self.optimizer, self.info),
                                 self.scheduler.state_dict(), self._trainer_state(), self.cfg.save_total_limit,
                                 extra=extra)
        else:
            error = None
            if self.info.is_main:
                try:
                    ckpt.save_final(out_dir, lambda d: self.writer.write(d, state, final=True))
                except ckpt.OutputError as e:
                    error = e
            if ckpt.any_failed(error, self.info):  # the other ranks stop too instead of waiting at a barrier
                raise error or ckpt.OutputError(f"rank 0 could not write the final output to {out_dir}")

    # -- one optimizer step ----------------------------------------------------------------------------------

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        micro = self.sampler.micro_batches(self.step, self.info.rank)
        batches = [self.data.batch(ix) for ix in micro]
        # [target tokens, real (unpadded) input tokens] over the whole global batch, before any backward.
        counts = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        for ix, (ids, labels) in zip(micro, batches):
            counts[0] += (labels[:, 1:] != IGNORE_INDEX).sum().item()
            counts[1] += self.data.num_tokens(ix)
        all_reduce_sum(counts, self.info)
        n_target = max(counts[0].item(), 1.0)
        ids = [b[0] for b in batches]
        labels = [b[1] for b in batches]
        accum = len(batches)
        scale = self.info.world / n_target  # each rank's share of the global mean (FSDP/DDP average over ranks)
        if self.graphed is not None and self.graphed.wants(ids):
            sums, norm = self.graphed.run(ids, labels, scale)
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
        else:
            dev = self.info.device
            sums = self._accumulate([t.to(dev) for t in ids], [t.to(dev) for t in labels], scale)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            norm = self._clip()
            lr = self.scheduler.get_last_lr()[0]
            if self.scaler is not None:
                prev = self.scaler.get_scale()
                self.scaler.step(self.optimizer)  # skipped when the gradients hold inf/nan
                self.scaler.update()
                if self.scaler.get_scale() >= prev:  # not skipped: HF steps the schedule only then
                    self.scheduler.step()
            else:
                self.optimizer.step()
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP2
        lr = float(lr)
        all_reduce_sum(sums, self.info)
        self.step += 1
        ce_mean = sums[0].item() / n_target
        aux_mean = sums[1].item() / (accum * self.info.world)  # the balance loss of one micro-batch, on average
        dt = time.perf_counter() - t0
        loss = ce_mean + aux_mean * accum * self.aux_weight  # what the gradient is of
        return {"loss": loss, "ce_loss": ce_mean, "aux_loss": aux_mean, "learning_rate": lr,
                "grad_norm": grad_norm, "tokens_per_s": counts[1].item() / dt, "step_time_s": dt,
                "epoch": self.step / self.sampler.steps_per_epoch}

    def _losses(self, ids: torch.Tensor, labels: torch.Tensor):
        """(sum of the token cross-entropies, balance loss or None). One process and FSDP2 (which gathers the root's
        parameters around model.hidden_states too: distributed.wrap_model): the lm_head + cross-entropy run in token
        chunks (train/loss.py), never holding [tokens, vocab] fp32 logits. DDP, label smoothing: through the model's
        forward and full logits (DDP's reducer is armed by the wrapper's forward only)."""
        smoothing = self.cfg.label_smoothing_factor
        if self.plan.strategy != "ddp" and hasattr(self.model, "hidden_states") and not smoothing:
            h, aux = self.model.hidden_states(ids, want_aux=True)
            h = h[:, :-1].reshape(-1, h.shape[-1])  # position t predicts token t+1
            ce = chunked_cross_entropy(h, self.model.lm_head, labels[:, 1:].reshape(-1), IGNORE_INDEX,
                                       preserve_rng_state=self.random_forward)
            return ce, aux
        out = self.model(ids, return_aux_loss=True)
        logits = out.logits[:, :-1]  # [B, T-1, V]
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=smoothing)
        return ce, out.aux_loss

    def _accumulate(self, ids, labels, scale) -> torch.Tensor:
        """Forward + backward of each micro-batch (ids / labels: [B, T] device tensors, one per micro-batch; or
        [A, B, T]), gradients summed into .grad. Returns [ce sum, aux sum] (float64, on the device)."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        accum = len(ids)
        for m, (i, l) in enumerate(zip(ids, labels)):
            with grad_sync(self.model, self.plan, sync=m == accum - 1):
                with self._autocast():
                    ce, aux = self._losses(i, l)
                    aux = aux if aux is not None else ce.new_zeros(())
                    loss = ce * scale + aux * self.aux_weight
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            sums[0] += ce.detach().double()
            sums[1] += aux.detach().double()
        return sums

    def _device_step(self, ids: torch.Tensor, labels: torch.Tensor, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """What a CUDA graph captures (graphed_step.py): accumulate, clip, AdamW; no host sync anywhere."""
        sums = self._accumulate(ids, labels, scale)
        norm = self._clip()
        self.optimizer.step()
        return sums, norm

    def _clip(self) -> torch.Tensor:
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)

    # -- the run ---------------------------------------------------------------------------------------------

    def train(self) -> dict:
        cfg = self.cfg
        if self.resume_from:
            self._resume()
        self.model.train()
        logger = RunLogger(cfg.output_dir, cfg.logging_dir, cfg.report_to, self.total_steps, self.step,
                           enabled=self.info.is_main, show_bar=not cfg.disable_tqdm, run_name=cfg.run_name,
                           run_config=self._run_config())
        logger.message(f"training: {len(self.data)} examples, global batch {self.sampler.global_batch} "
                       f"({cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps} accumulation x "
                       f"{self.info.world} processes), {self.total_steps} steps, "
                       f"{sum(p.numel() for p in self.trainable):,} trainable parameters")
        tokens, t_start, start_step = 0.0, time.perf_counter(), self.step
        try:
            while self.step < self.total_steps:
                metrics = self.train_step()
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"loss became {metrics['loss']} at step {self.step}; lower "
                                             "--learning_rate or --max_grad_norm")
                tokens += metrics["tokens_per_s"] * metrics["step_time_s"]
                log_now = (self.step % cfg.logging_steps == 0 or self.step == self.total_steps
                           or (cfg.logging_first_step and self.step == 1))
                if log_now:
                    self.history.append({"step": self.step, **metrics})
                logger.step(self.step, metrics, log_now)
                if self._should_save():
                    self._save()
        finally:
            logger.close()
        self._save(cfg.output_dir)  # the final output, then the `completed` marker
        elapsed = time.perf_counter() - t_start
        return {"steps": self.step, "steps_this_run": self.step - start_step, "tokens_per_s": tokens / elapsed,
                "final_loss": self.history[-1]["loss"] if self.history else None, "history": self.history}

    def _run_config(self) -> dict:
        c = self.cfg
        keys = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "model_max_length",
                "lr_scheduler_type", "warmup_steps", "seed", "bf16")
        return {k: getattr(c, k) for k in keys}

    def _should_save(self) -> bool:
        if self.step == self.total_steps:
            return False  # the final output is written instead
        if self.cfg.save_strategy == "steps":
            return self.step % self.cfg.save_steps == 0
        if self.cfg.save_strategy == "epoch":
            return self.step % self.sampler.steps_per_epoch == 0
        return False
