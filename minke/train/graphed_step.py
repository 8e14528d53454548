"""One optimizer step replayed as a CUDA graph (`--cuda_graphs`, on by default on one GPU).

Why: a LoRA step on the DeepSeek-V2-Lite shape (27 layers, 4 x 1024 tokens, gradient checkpointing) launches ~10K
kernels: forward, recompute and backward of every layer, then AdamW. On an H200 its GPU work takes ~245 ms but the
step takes ~550 ms: Python, autograd and dispatch, not the GPU, set the pace (bench/bench_finetune.py --profile,
bench/RESULTS.md). Replaying a captured graph costs one launch.

What is captured: the accumulation micro-batches' forward + backward (gradient checkpointing included), gradient
clipping and the AdamW update. AdamW runs `capturable` (its step counts and learning rates are device tensors), so
the LR schedule still applies: the scheduler writes the learning rate into the captured tensor. Inputs (ids,
labels [accum, B, T]) and the loss scale (world / target tokens of the global batch) are static device buffers
copied in before each replay; outputs are the [cross-entropy, balance-loss] sums and the gradient norm.

When: one process (DDP/FSDP hooks talk to other ranks), CUDA, no fp16 loss scaler (its skip-or-step is a host
decision), and every micro-batch of the step the shape of the captured one (a fixed block size: `minke train`,
`--pad_to_max_length`-style data; SFT batches padded per batch change shape and run eagerly). The first step runs
eagerly (lazy initialisation: optimizer state, cuBLAS workspaces, Triton autotuning). The first later step whose
shape equals the previous step's runs eagerly on the capture stream and is then captured; from then on a step of
the captured shape is a replay, any other runs eagerly. A capture that fails (an op that syncs with the host) turns graphs off with a notice naming the error,
and training continues eagerly: the graphs change the speed, never the result.
"""

from __future__ import annotations

from typing import Callable

import torch

# step_fn(ids [A, B, T], labels [A, B, T], scale) -> (sums [2] float64 on the device, gradient norm 0-d tensor)
StepFn = Callable[[torch.Tensor, torch.Tensor, "float | torch.Tensor"], tuple]


def graph_unavailable_reason(device: torch.device, distributed: bool, fp16: bool) -> str | None:
    """Why a run cannot use graphed steps, or None."""
    if device.type != "cuda":
        return f"training runs on {device.type}"
    if distributed:
        return "DDP/FSDP synchronise with other ranks inside the step"
    if fp16:
        return "--fp16's loss scaler decides on the host whether a step is skipped"
    return None


class GraphedStep:
    """Captures `step_fn` once and replays it. `optimizer` must be the one step_fn steps; `log` takes one line."""

    WARMUP_STEPS = 1  # eager steps before the capture step

    def __init__(self, step_fn: StepFn, optimizer: torch.optim.Optimizer, device: torch.device, log=print):
        self.step_fn, self.optimizer, self.device, self.log = step_fn, optimizer, device, log
        self.graph: torch.cuda.CUDAGraph | None = None
        self.disabled = False
        self.eager_steps = 0
        self.shape: tuple | None = None
        self._static: tuple | None = None  # (ids, labels, scale) device buffers read by the graph
        self._outputs: tuple | None = None  # (sums, norm) written by the graph
        self._lrs: list[torch.Tensor] = []
        self._shape_notice = False
        self._last_shape: tuple | None = None

    # -- eligibility ---------------------------------------------------------------------------------------------
    def wants(self, ids: list[torch.Tensor]) -> bool:
        """Whether this step (its micro-batches' ids) goes through the graph (replay or capture)."""
        if self.disabled:
            return False
        shapes = {tuple(t.shape) for t in ids}
        if len(shapes) != 1:
            return False
        shape = (len(ids), *shapes.pop())
        if self.graph is not None and shape != self.shape:
            if not self._shape_notice:
                self._shape_notice = True
                self.log(f"notice: cuda graphs: a step of shape {list(shape)} runs eagerly (the graph was captured "
                         f"for {list(self.shape)})")
            return False
        return True

    # -- one step ------------------------------------------------------------------------------------------------
    def run(self, ids: list[torch.Tensor], labels: list[torch.Tensor], scale: float):
        """(sums, norm) of this step, which has been applied to the parameters."""
        if self.graph is not None:
            return self._replay(ids, labels, scale)
        shape = (len(ids), *ids[0].shape)
        if self.eager_steps < self.WARMUP_STEPS or shape != self._last_shape:
            # Warm-up, or a shape not seen on the previous step: capture only a shape that repeats (batches padded
            # per batch rarely do, and each capture holds a step's activations in its own memory pool).
            self.eager_steps += 1
            self._last_shape = shape
            out = self.step_fn(self._stack(ids), self._stack(labels), scale)
            self.optimizer.zero_grad(set_to_none=True)
            return out
        return self._capture(ids, labels, scale)

    def _stack(self, ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(ts).to(self.device, non_blocking=True)

    def _replay(self, ids, labels, scale):
        s_ids, s_labels, s_scale = self._static
        for m, (i, l) in enumerate(zip(ids, labels)):
            s_ids[m].copy_(i, non_blocking=True)
            s_labels[m].copy_(l, non_blocking=True)
        s_scale.fill_(scale)
        self._sync_lr()
        self.graph.replay()
        self.optimizer.zero_grad(set_to_none=True)  # as the eager step leaves them (the graph keeps its buffers)
        return self._outputs

    def _capture(self, ids, labels, scale):
        s_ids, s_labels = self._stack(ids), self._stack(labels)
        s_scale = torch.tensor(scale, dtype=torch.float32, device=self.device)
        self._make_capturable()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # This step for real, eagerly on the capture stream (its lazy per-stream state, e.g. cuBLAS
            # workspaces, then exists before the capture).
            out = self.step_fn(s_ids, s_labels, s_scale)
            out = tuple(t.clone() for t in out)
            self.optimizer.zero_grad(set_to_none=True)  # captured backward must write, not accumulate, .grad
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the eager step's cached blocks; the graph gets its own pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream):
                outputs = self.step_fn(s_ids, s_labels, s_scale)
        except Exception as e:  # an op that cannot be captured: the run goes on eagerly
            self.disabled = True
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(self.device)
            self.log(f"notice: cuda graphs off: capturing the training step failed "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); training continues eagerly")
            return out
        self.optimizer.zero_grad(set_to_none=True)
        self.graph, self._static, self._outputs = graph, (s_ids, s_labels, s_scale), outputs
        self.shape = tuple(s_ids.shape)
        self.log(f"cuda graphs: training step captured for micro-batches of {list(self.shape[1:])} x "
                 f"{self.shape[0]} accumulation")
        return out

    # -- the optimizer ---------------------------------------------------------------------------------------
    def _make_capturable(self) -> None:
        """AdamW with device-side step counts and learning rates: what a captured update can read and advance."""
        for group in self.optimizer.param_groups:
            group["capturable"] = True
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.device)
            self._lrs.append(group["lr"])
        for state in self.optimizer.state.values():
            if "step" in state and state["step"].device != self.device:
                state["step"] = state["step"].to(self.device, torch.float32)

    def _sync_lr(self) -> None:
        """The graph reads the lr tensors it was captured with; a scheduler (or a resumed state) that replaced a
        group's lr by another object must not be ignored."""
        for group, t in zip(self.optimizer.param_groups, self._lrs):
            if group["lr"] is not t:
                t.fill_(float(group["lr"]))
                group["lr"] = t
