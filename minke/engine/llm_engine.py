"""The engine loop: schedule -> run -> sample -> detokenize -> check stops, one step at a time, many requests at
once (continuous batching over the paged KV cache, with chunked prefill, preemption and prefix caching).

One request's path: InputProcessor (tokenize, validate, build the Request) -> Scheduler (which tokens run this
step, KV blocks) -> StepPipeline (the step's chunks and sampling batch, queued on the Runner; with async
scheduling one step ahead) -> Runner / Worker (forward batch, CUDA graphs, model, kernels) -> Sampler ->
OutputProcessor (text, logprobs, stops, RequestOutputs).

A step that fails (any exception in scheduling, inputs, forward or sampling: an unforeseen bad value of one
request) fails only the request that caused it. The steps in flight are dropped (StepPipeline: async
scheduling's placeholders removed), their sequences reset for recompute (Scheduler.reset), and those suspect
requests are re-run alone, one request per step (Scheduler.isolate), until each has sampled a token again. One
whose step fails alone ends with finish_reason "error" and RequestOutput.error set (vLLM's FinishReason.ERROR);
the others continue with exactly the tokens they would have had (greedy; a seeded sampled request may draw
differently once its generator was advanced by the dropped step). `LLM.generate` returns that request's output
with its error, in order, as vLLM does; AsyncLLM raises it in that request's stream only. The normal path pays
nothing for this (a try block and one attribute test per step)."""

from __future__ import annotations

import logging
from collections import deque

from ..config import load_config
from ..lora.request import LoRARequest
from ..runner.runner import Runner
from ..sampling_params import SamplingParams
from ..tokenizer import Tokenizer
from .block_manager import BlockManager
from .config import EngineConfig
from .input_processor import InputProcessor, Prompt
from .output_processor import OutputProcessor, StepSamples
from .outputs import RequestOutput
from .request import Request
from .scheduler import Scheduler
from .step_pipeline import StepFailure, StepPipeline

logger = logging.getLogger("minke")


class LLMEngine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.model_config = load_config(cfg.model)
        self.tokenizer = Tokenizer.from_dir(cfg.model, chat_template=cfg.chat_template)
        # tensor_parallel_size > 1: ranks 1.. run in spawned processes (minke/runner/executor.py)
        self.runner = Runner(cfg.worker_config(self.model_config), cfg.cache_config(), cfg.max_num_seqs,
                             cfg.enforce_eager)
        self.max_model_len = self._resolve_max_model_len()
        budget = cfg.step_token_budget(self.max_model_len)
        self.runner.capture_graphs(self.max_model_len, min(cfg.prefill_graph_max_tokens, budget))
        self.block_manager = BlockManager(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(cfg.scheduler_config(self.max_model_len, self.runner.graphs is not None),
                                   self.block_manager)
        self.input_processor = InputProcessor(self.tokenizer, self.model_config, self.max_model_len, cfg.block_size,
                                              self.runner.device, cfg.max_num_seqs, enable_lora=cfg.enable_lora)
        self.loras: dict[int, LoRARequest] = {}  # registered adapters by lora_int_id (add_lora)
        self.output_processor = OutputProcessor(self.tokenizer, self.max_model_len)
        self.async_scheduling = bool(cfg.async_scheduling)
        self.pipeline = StepPipeline(self.scheduler, self.runner, self.output_processor.owner, self.max_model_len,
                                     self.async_scheduling, self.input_processor.structured)
        # Step-failure recovery: the suspect requests still to be run alone, and the probe under way (the
        # request id, and each of its live sequences' token count when its probe began).
        self._removed_in_use: set[int] = set()  # adapters removed while requests still ran with them
        self._suspects: deque[str] = deque()
        self._probe: tuple[str, dict[int, int]] | None = None
        self.num_step_failures = 0  # steps that failed (each recovered from)
        if self.async_scheduling:
            logger.info("async scheduling: the next step is queued while the GPU runs the current one")
        logger.info("KV cache: %d blocks x %d = %d tokens (%.1f KiB/token%s); max_model_len %d",
                    self.runner.num_blocks, cfg.block_size, self.runner.capacity_tokens,
                    self.runner.kv_bytes_per_token / 1024, self._kv_dtype_note(), self.max_model_len)

    def _kv_dtype_note(self) -> str:
        """', fp8 ... = 1.95x the tokens of bfloat16' when --kv-cache-dtype is not the model dtype, else ''."""
        if self.cfg.kv_cache_dtype == "auto":
            return ""
        worker = self.runner.executor.worker
        ratio = worker.kv_bytes_per_token("auto") / self.runner.kv_bytes_per_token
        per = "token" if self.model_config.is_mla else "token and KV head"
        return (f", {self.cfg.kv_cache_dtype} ({str(worker.kv_cache_dtype).removeprefix('torch.')}, a scale per "
                f"{per}): {ratio:.2f}x the tokens of {str(self.runner.dtype).removeprefix('torch.')}")

    def _resolve_max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        cap = self.runner.capacity_tokens
        want = self.cfg.max_model_len
        if want is not None:
            if want > cap:
                raise ValueError(f"max_model_len {want} needs more KV cache than is available ({cap} tokens); "
                                 "lower --max-model-len, raise --gpu-memory-utilization or --kv-cache-tokens")
            longest = self.model_config.max_context_len
            if want > longest:
                scaled = f" x rope factor {self.model_config.rope.factor:g}" if longest != limit else ""
                if not self.cfg.allow_long_max_model_len:
                    raise ValueError(
                        f"max_model_len {want} is above the model's context of {longest} tokens "
                        f"(max_position_embeddings {limit}{scaled}, {self.model_config.source}): positions past it "
                        "were never trained and give junk output. Lower --max-model-len, or pass "
                        "--allow-long-max-model-len (LLM(..., allow_long_max_model_len=True)) to run anyway")
                logger.warning("max_model_len %d exceeds the model's context of %d tokens (allowed by "
                               "allow_long_max_model_len); the output past it is usually junk", want, longest)
            return want
        if cap < limit:
            # The V2 configs say 163840 positions: cap to what the cache holds instead of failing start-up.
            logger.warning("max_model_len capped to %d tokens (the KV cache capacity); the config allows %d. "
                           "Pass --max-model-len to choose.", cap, limit)
            return cap
        return limit

    # ------------------------------------------------------------------ requests
    @property
    def requests(self) -> dict[str, Request]:
        """The requests in flight, by id."""
        return self.output_processor.requests

    # ------------------------------------------------------------------ adapters
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Registers an adapter (read and checked now: AdapterError names what cannot be served). False when it
        is already registered. An id is one adapter: another path or name under a registered id is an error."""
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"add_lora takes a LoRARequest, got {type(lora_request).__name__}")
        if not self.cfg.enable_lora:
            raise ValueError("LoRA is not enabled: start the engine with enable_lora=True (--enable-lora)")
        old = self.loras.get(lora_request.lora_int_id)
        if old is not None:
            if (old.lora_path, old.lora_name) != (lora_request.lora_path, lora_request.lora_name):
                raise ValueError(f"lora_int_id {lora_request.lora_int_id} is already adapter {old.lora_name!r} "
                                 f"({old.lora_path}); remove it first or use another id")
            return False
        self.runner.add_lora(lora_request)
        self.loras[lora_request.lora_int_id] = lora_request
        return True

    def remove_lora(self, lora_int_id: int) -> bool:
        """Unregisters an adapter; requests still running with it keep its device slot until they end."""
        if self.loras.pop(lora_int_id, None) is None:
            return False
        if any(getattr(s.seq, "lora_int_id", 0) == lora_int_id for r in self.requests.values() for s in r.states):
            self._removed_in_use.add(lora_int_id)
            return True
        self.runner.remove_lora(lora_int_id)
        return True

    def list_loras(self) -> list[LoRARequest]:
        return list(self.loras.values())

    def _drop_unused_loras(self) -> None:
        """Adapters removed while requests used them go once the last of those requests has ended."""
        live = {s.seq.lora_int_id for r in self.requests.values() for s in r.states}
        for lid in [i for i in self._removed_in_use if i not in live]:
            self._removed_in_use.discard(lid)
            if lid not in self.loras:
                self.runner.remove_lora(lid)

    def add_request(self, request_id: str, prompt: Prompt | Request, params: SamplingParams | None = None,
                    arrival_time: float | None = None, strict: bool = False,
                    lora_request: LoRARequest | None = None) -> None:
        """prompt: text, token ids or vLLM's prompt dicts (tokenized and checked here), or a Request the
        InputProcessor already built (`process`; then params, arrival_time, strict and lora_request are its own).
        lora_request: registered here first if it is new (add_lora)."""
        if isinstance(prompt, Request):
            req = prompt
            if req.request_id != request_id:
                raise ValueError(f"request id {request_id!r} does not match the processed request's "
                                 f"{req.request_id!r}")
        else:
            if request_id in self.output_processor.requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            req = self.input_processor.process(request_id, prompt, params, arrival_time, strict, lora_request)
        if req.lora_request is not None:
            self.add_lora(req.lora_request)
        self.output_processor.add(req)
        for s in req.states:
            self.scheduler.add(s.seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        return self._release(self.output_processor.abort(request_id))

    def _release(self, ended: tuple[RequestOutput, list] | None) -> RequestOutput | None:
        """A request the OutputProcessor ended (abort / fail): its unfinished sequences leave the scheduler."""
        if ended is None:
            return None
        out, live = ended
        for seq in live:
            self.scheduler.abort(seq.seq_id)
        return out

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.requests)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One model step. Returns the cumulative output of every request that got a token or finished
        (final_only requests: only when finished). With async scheduling the next step is already queued on
        the GPU when this returns (StepPipeline)."""
        outputs: list[RequestOutput] = []

        def process(samples: StepSamples) -> None:
            outs, finished = self.output_processor.process(samples)
            for seq, reason in finished:
                self.scheduler.finish(seq, reason)
            outputs.extend(outs)

        if self._suspects:
            self._isolation_step(process, outputs)
            return outputs
        try:
            self.pipeline.step(process)
        except StepFailure as f:
            self._quarantine(f)
        if self._removed_in_use:
            self._drop_unused_loras()
        return outputs

    # ------------------------------------------------------------------ step failures
    def _quarantine(self, f: StepFailure) -> None:
        """After a failed step: reset its sequences for recompute and queue their requests to be run alone."""
        self.num_step_failures += 1
        owner = self.output_processor.owner
        seqs = [s for s in f.seqs if s.seq_id in owner]
        rids = list(dict.fromkeys(owner[s.seq_id][0].request_id for s in seqs))
        logger.warning("engine step failed (%s); running its %d request(s) alone to find the one at fault",
                       f, len(rids), exc_info=f.error)
        self.scheduler.reset(seqs)
        self._suspects.extend(r for r in rids if r not in self._suspects)

    def _isolation_step(self, process, outputs: list[RequestOutput]) -> None:
        """One step of the first suspect request alone (synchronous). It is cleared once every live sequence of
        it has a new token; it is failed if its step fails."""
        requests, suspects = self.output_processor.requests, self._suspects
        while suspects:
            rid = suspects[0]
            req = requests.get(rid)
            if req is not None:
                break
            suspects.popleft()  # finished or aborted meanwhile
            self._probe = None
        else:
            self.scheduler.isolate(None)
            return
        live = [s.seq for s in req.states if s.finish_reason is None]
        if self._probe is None or self._probe[0] != rid:
            self._probe = (rid, {s.seq_id: len(s.token_ids) for s in live})
            self.scheduler.isolate(self._probe[1])
        was_async, self.pipeline.async_scheduling = self.pipeline.async_scheduling, False
        try:
            ran = self.pipeline.step(process)
        except StepFailure as f:
            self.num_step_failures += 1
            logger.error("request %s fails alone (%s): it ends with an error, the others go on", rid, f)
            ran = False
            self.scheduler.reset([s for s in f.seqs if s.seq_id not in self._probe[1]])  # none, in principle
            out = self._release(self.output_processor.fail(rid, str(f)))
            if out is not None:
                outputs.append(out)
        finally:
            self.pipeline.async_scheduling = was_async
        start = self._probe[1]
        sampled_again = all(s.finish_reason is not None or len(s.seq.token_ids) > start[s.seq.seq_id]
                            for s in req.states if s.seq.seq_id in start)
        if not ran or rid not in requests or sampled_again:
            suspects.popleft()  # cleared (or failed, or nothing left to run of it)
            self._probe = None
        if not suspects:
            self.scheduler.isolate(None)

    # ------------------------------------------------------------------ stats
    @property
    def step_stats(self) -> dict:
        return self.pipeline.step_stats

    @property
    def step_trace(self):
        return self.pipeline.step_trace

    @step_trace.setter
    def step_trace(self, trace) -> None:
        self.pipeline.step_trace = trace

    def get_stats(self) -> dict:
        bm = self.block_manager
        return dict(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage(),
            kv_capacity_tokens=self.runner.capacity_tokens,
            num_preemptions=self.scheduler.num_preemptions_total,
            prefix_cache_queries=bm.prefix_queries_tokens,
            prefix_cache_hits=bm.prefix_hits_tokens,
            num_step_failures=self.num_step_failures,
            **self.output_processor.stats,
        )
