"""Multi-process execution: rank 0 is the calling process (the engine: scheduler, sampler), ranks 1..W-1 are spawned
with torch.multiprocessing and loop over the calls rank 0 broadcasts. Control messages (method name + picklable
arguments, e.g. the step's SeqChunks) travel over a gloo group; the model's own collectives use NCCL on GPUs and
gloo on CPU.

    executor = make_executor(WorkerConfig(model_dir, tensor_parallel_size=2))
    executor.collective_rpc("allocate_kv_cache", num_blocks, block_size)
    logits = executor.execute(chunks)    # [S, V] on rank 0's device
    executor.shutdown()
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import shutil
import tempfile
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import load_config
from .input_batch import SeqChunk
from .quantization import check_quantization
from ..parallel.state import ParallelConfig, check_model_fits
from .worker import Worker, WorkerConfig

_SHUTDOWN = "shutdown"


class RemoteError(str):
    """A rank's exception, as its traceback text (exceptions need not be picklable)."""


class ModelExecutor:
    """What the engine calls. `worker` is rank 0's Worker (model shard, device, dtype) in this process."""

    worker: Worker

    def execute(self, chunks: list[SeqChunk], decode_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One model step on every rank; returns the logits [S, V] of the sampled rows on rank 0. decode_ids: see
        Worker.run (rank 0's; the multi-process executor broadcasts them to the other ranks)."""
        return self.worker.execute(chunks, decode_ids)

    def collective_rpc(self, method: str, *args) -> list[Any]:
        """Call Worker.<method>(*args) on every rank; results in rank order."""
        return [getattr(self.worker, method)(*args)]

    def shutdown(self) -> None:
        pass


class LocalExecutor(ModelExecutor):
    """tensor_parallel_size 1: one Worker, no processes, no process group (make_executor checks the config)."""

    def __init__(self, cfg: WorkerConfig):
        self.worker = Worker(cfg, 0)


class MultiprocExecutor(ModelExecutor):
    def __init__(self, cfg: WorkerConfig):
        world = cfg.tensor_parallel_size
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialised in this process; minke's tensor parallel "
                               "executor creates its own process group")
        if cfg.device.startswith("cuda") and torch.cuda.device_count() < world:
            raise ValueError(f"tensor_parallel_size={world} needs {world} GPUs, found {torch.cuda.device_count()}")
        self.cfg, self.world, self._closed = cfg, world, False
        self._dir = tempfile.mkdtemp(prefix="minke-tp-")
        init = "file://" + os.path.join(self._dir, "rendezvous")
        ctx = mp.get_context("spawn")
        self._reports = ctx.Queue()
        self._procs = [ctx.Process(target=worker_main, args=(r, cfg, init, self._reports), daemon=True,
                                   name=f"minke-tp-rank{r}") for r in range(1, world)]
        for proc in self._procs:
            proc.start()
        try:
            self._cpu_group = _init_group(cfg, 0, init)
            self.worker = Worker(cfg, 0)
            self._wait_ready()
        except BaseException:
            self._kill()
            raise
        atexit.register(self.shutdown)

    def execute(self, chunks: list[SeqChunk], decode_ids: torch.Tensor | None = None) -> torch.Tensor:
        inputs = self.worker.prepare(chunks)  # bad input fails here, before any other rank is involved
        if decode_ids is None:
            self._send((("execute", (chunks,)), False))
        else:  # the chunks carry placeholders for these ids: every rank gets rank 0's by broadcast (execute_fed)
            decode_ids = decode_ids.contiguous()
            self._send((("execute_fed", (chunks, len(decode_ids))), False))
            dist.broadcast(decode_ids, src=0, group=self.worker.parallel.group)
        return self.worker.run(chunks, inputs, decode_ids)

    def collective_rpc(self, method: str, *args) -> list[Any]:
        self._send(((method, args), True))
        try:
            mine = getattr(self.worker, method)(*args)
        except Exception:  # still take part in the gather, or the other ranks wait forever
            mine = RemoteError(traceback.format_exc())
        results: list[Any] = [None] * self.world
        dist.gather_object(mine, results, dst=0, group=self._cpu_group)
        for rank, res in enumerate(results):
            if isinstance(res, RemoteError):
                raise RuntimeError(f"{method} failed on tensor-parallel rank {rank}:\n{res}")
        return results

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if all(p.is_alive() for p in self._procs):
                _broadcast((_SHUTDOWN, False), self._cpu_group)
            self.worker.close()
            for proc in self._procs:
                proc.join(timeout=30)
        finally:
            self._kill()

    # -------------------------------------------------------------------------------------------- internals
    def _send(self, msg) -> None:
        if self._closed:
            raise RuntimeError("the tensor-parallel executor has been shut down")
        dead = [(i + 1, p.exitcode) for i, p in enumerate(self._procs) if not p.is_alive()]
        if dead:
            self._kill()
            raise RuntimeError(f"tensor-parallel worker(s) exited: rank, exit code = {dead}")
        _broadcast(msg, self._cpu_group)

    def _wait_ready(self) -> None:
        ready = set()
        while len(ready) < self.world - 1:
            try:
                kind, rank, detail = self._reports.get(timeout=5)
            except Exception:  # queue.Empty: check that nobody died silently
                dead = [(i + 1, p.exitcode) for i, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"tensor-parallel worker(s) exited while loading: rank, exit code = {dead}")
                continue
            if kind == "error":
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start:\n{detail}")
            ready.add(rank)

    def _kill(self) -> None:
        self._closed = True
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=10)
        _leave_group(self.cfg)
        shutil.rmtree(self._dir, ignore_errors=True)


def make_executor(cfg: WorkerConfig) -> ModelExecutor:
    """The checks that need the model's config, made once, before any rank loads or spawns anything; the ranks
    get the config with their WorkerConfig instead of reading config.json again."""
    model_config = cfg.config or load_config(cfg.model)
    check_model_fits(model_config, ParallelConfig(cfg.tensor_parallel_size, 0, cfg.expert_parallel))
    check_quantization(cfg.quantization, model_config)
    cfg = dataclasses.replace(cfg, config=model_config)
    return LocalExecutor(cfg) if cfg.tensor_parallel_size == 1 else MultiprocExecutor(cfg)


def _init_group(cfg: WorkerConfig, rank: int, init_method: str):
    """Joins the world group; returns the group for control messages (gloo; None = the world group itself)."""
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(rank)
    dist.init_process_group(cfg.dist_backend, init_method=init_method, rank=rank, world_size=cfg.tensor_parallel_size,
                            timeout=datetime.timedelta(seconds=cfg.timeout_s))
    return None if cfg.dist_backend == "gloo" else dist.new_group(backend="gloo")


def _leave_group(cfg: WorkerConfig) -> None:
    if not dist.is_initialized():
        return
    if cfg.dist_backend == "nccl" and hasattr(dist.distributed_c10d, "_abort_process_group"):
        # destroy_process_group can hang in ncclCommDestroy once NCCL collectives were captured in CUDA graphs
        # (pytorch/pytorch#115388); aborting releases the communicators without waiting, and clears the state so
        # a later executor in this process can start a new group.
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()


def _broadcast(msg, group):
    box = [msg]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _die_with_parent() -> None:
    """Linux: this rank gets SIGKILL when the process that spawned it dies, even of SIGKILL (the engine-core
    process of `minke serve`): no rank keeps a GPU once its engine is gone (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def worker_main(rank: int, cfg: WorkerConfig, init_method: str, reports) -> None:
    """Entry point of spawned ranks 1..W-1."""
    _die_with_parent()
    try:
        group = _init_group(cfg, rank, init_method)
        worker = Worker(cfg, rank)
    except BaseException:
        reports.put(("error", rank, traceback.format_exc()))
        return
    reports.put(("ready", rank, None))
    try:
        while True:
            msg = _broadcast(None, group)
            if msg[0] == _SHUTDOWN:
                break
            (method, args), want_result = msg
            if want_result:
                try:
                    result = getattr(worker, method)(*args)
                except Exception:
                    result = RemoteError(traceback.format_exc())
                dist.gather_object(result, None, dst=0, group=group)
            else:
                getattr(worker, method)(*args)  # a failure here ends this rank; rank 0 sees it exited
    finally:
        worker.close()
        _leave_group(cfg)
