"""The engine loop: schedule -> run -> sample -> detokenize -> check stops, one step at a time, many requests at
once (continuous batching over the paged KV cache, with chunked prefill, preemption and prefix caching)."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from ..config import load_config
from ..sampling_params import SamplingParams
from ..tokenizer import IncrementalDetokenizer, Tokenizer, detokenize_output
from .block_manager import BlockManager
from .config import EngineConfig
from .input_batch import SeqChunk
from .model_runner import ModelRunner, PendingSample
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampler import SamplingBatch, make_generator
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from .sequence import Sequence

logger = logging.getLogger("minke")


@dataclass
class SeqState:
    """Per generated sequence: text so far, logprobs, and why it stopped.

    detok None (a final_only request without stop strings): text is not built token by token; the first
    num_detok output tokens are what the incremental detokenizer would have been fed, and the engine decodes them
    at once (detokenize_output) when it reports the request."""

    seq: Sequence
    index: int
    detok: IncrementalDetokenizer | None
    generator: torch.Generator | None
    text: str = ""
    num_detok: int = 0  # deferred detokenization: output tokens to decode; -1 once text holds them
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    states: list[SeqState]
    metrics: RequestMetrics
    max_tokens: int
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    final_only: bool = False  # params.output_kind == "final_only": reported once, when finished

    @property
    def finished(self) -> bool:
        states = self.states
        if len(states) == 1:
            return states[0].finish_reason is not None
        return all(s.finish_reason is not None for s in states)

    def output(self) -> RequestOutput:
        """Deferred texts must be decoded first (LLMEngine._output)."""
        outs = [CompletionOutput(s.index, s.text, s.seq.output_token_ids,
                                 s.cumulative_logprob if s.logprobs is not None else None,
                                 list(s.logprobs) if s.logprobs is not None else None,
                                 s.finish_reason, s.stop_reason) for s in self.states]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, self.finished, self.metrics)


PLACEHOLDER = -1  # a sequence's last token while the step that samples it runs ahead of the host (async scheduling)


def _upload(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 [len(values)] on device without waiting for the stream (a blocking copy would wait for the step
    queued ahead); the pageable source is staged before the call returns."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


@dataclass
class _Step:
    """A model step queued on the device, until its samples are processed (LLMEngine._complete)."""

    sched: SchedulerOutput
    num_decodes: int
    num_prefills: int  # prefill chunks (0: a decode step)
    sample_seqs: list[Sequence]  # the sequences of the sampled rows, in row order
    pending: PendingSample | None  # None: no chunk samples
    penalties: bool  # some row has a repetition / frequency / presence penalty
    t_start: float
    # Async scheduling: the scheduler already recorded this step, with PLACEHOLDER tokens appended to these
    # sequences (None: not recorded yet).
    got: list[Sequence] | None = None


class LLMEngine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.model_config = load_config(cfg.model)
        self.tokenizer = Tokenizer.from_dir(cfg.model, chat_template=cfg.chat_template)
        # tensor_parallel_size > 1: ranks 1.. run in spawned processes (minke/parallel/launcher.py)
        self.runner = ModelRunner(cfg, self.model_config)
        self.max_model_len = self._resolve_max_model_len()
        budget = cfg.max_num_batched_tokens or (8192 if cfg.enable_chunked_prefill else self.max_model_len)
        self.runner.capture_graphs(self.max_model_len, min(cfg.prefill_graph_max_tokens, budget))
        self.block_manager = BlockManager(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        mixed = cfg.mixed_batches if cfg.mixed_batches is not None else self.runner.graphs is None
        self.scheduler = Scheduler(SchedulerConfig(cfg.max_num_seqs, budget, cfg.enable_chunked_prefill,
                                                   max_model_len=self.max_model_len, mixed_batches=mixed),
                                   self.block_manager)
        self.requests: dict[str, Request] = {}
        self._seq_owner: dict[int, tuple[Request, SeqState]] = {}
        self._seq_ids = itertools.count()
        self._sampling_cache: tuple[list[int], SamplingBatch] | None = None
        self.stats = dict(prompt_tokens_total=0, generation_tokens_total=0, num_requests_finished=0)
        # Where the steps' time goes (benchmarks): steps of each kind, their rows / tokens and wall seconds (a step
        # ends with the sampled tokens on the host, so its wall time covers the GPU work too).
        self.step_stats = dict(decode_steps=0, decode_rows=0, decode_s=0.0, prefill_steps=0, prefill_tokens=0,
                               prefill_s=0.0, queued_ahead=0)  # queued_ahead: steps queued by async scheduling
        self.step_trace: list[tuple[str, int, int, float]] | None = None  # a list: (kind, tokens, seqs, s) per step
        self.async_scheduling = bool(cfg.async_scheduling)
        self._inflight: _Step | None = None  # async scheduling: the step queued ahead
        self._t_last_complete = 0.0
        if self.async_scheduling:
            logger.info("async scheduling: the next step is queued while the GPU runs the current one")
        logger.info("KV cache: %d blocks x %d = %d tokens (%.1f KiB/token); max_model_len %d",
                    self.runner.num_blocks, cfg.block_size, self.runner.capacity_tokens,
                    self.runner.kv_bytes_per_token / 1024, self.max_model_len)

    # ------------------------------------------------------------------ set-up
    def _resolve_max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        cap = self.runner.capacity_tokens
        want = self.cfg.max_model_len
        if want is not None:
            if want > cap:
                raise ValueError(f"max_model_len {want} needs more KV cache than is available ({cap} tokens); "
                                 "lower --max-model-len, raise --gpu-memory-utilization or --kv-cache-tokens")
            if want > limit:
                logger.warning("max_model_len %d exceeds max_position_embeddings %d of the config", want, limit)
            return want
        if cap < limit:
            # The V2 configs say 163840 positions: cap to what the cache holds instead of failing start-up.
            logger.warning("max_model_len capped to %d tokens (the KV cache capacity); the config allows %d. "
                           "Pass --max-model-len to choose.", cap, limit)
            return cap
        return limit

    # ------------------------------------------------------------------ requests
    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt):
            raise ValueError("a prompt must be a string or a list of token ids")
        return None, list(prompt)

    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams, strict: bool = False) -> None:
        """Raises ValueError for a prompt the engine cannot serve. strict (the server's rule): the prompt plus
        max_tokens must fit in the context, as OpenAI checks; otherwise generation stops at the limit."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        want = n + (params.max_tokens or 0)
        if n >= self.max_model_len or (strict and want > self.max_model_len):
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                             f"requested {want} tokens ({n} in the prompt, {params.max_tokens or 0} for the "
                             "completion). Please reduce the prompt or the completion length.")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, strict: bool = False) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.encode_prompt(prompt)
        self.check_prompt(ids, params, strict=strict)
        max_tokens = min(params.max_tokens or self.max_model_len, self.max_model_len - len(ids))
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        stop_ids = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            stop_ids.update(self.model_config.eos_token_ids)
            if self.tokenizer.eos_token_id is not None:
                stop_ids.add(self.tokenizer.eos_token_id)
        req = Request(request_id, text, ids, params, [], RequestMetrics(arrival), max_tokens, frozenset(stop_ids),
                      final_only=params.output_kind == "final_only")
        # final_only without stop strings: nothing needs the text before the end, so decode it once then.
        deferred = req.final_only and not params.stop
        for i in range(params.n):
            seq = Sequence(next(self._seq_ids), ids, params, arrival, self.cfg.block_size)
            gen = None
            if params.seed is not None:
                gen = make_generator(params.seed + i, self.runner.device)
            detok = None if deferred else IncrementalDetokenizer(self.tokenizer, ids,
                                                                 skip_special_tokens=params.skip_special_tokens)
            state = SeqState(seq, i, detok, gen, logprobs=[] if params.logprobs is not None else None)
            req.states.append(state)
            self._seq_owner[seq.seq_id] = (req, state)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.stats["prompt_tokens_total"] += len(ids)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for s in req.states:
            if s.finish_reason is None:
                self.scheduler.abort(s.seq.seq_id)
                s.finish_reason = "abort"
            self._seq_owner.pop(s.seq.seq_id, None)
        req.metrics.finished_time = time.monotonic()
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One model step. Returns the cumulative output of every request that got a token or finished
        (final_only requests: only when finished).

        Async scheduling: before waiting for this step's sampled tokens, the next step is scheduled and queued
        behind it on the GPU (its decode rows read this step's samples on the device), so the host work between
        steps (this step's outputs, the next one's scheduling and inputs) overlaps the GPU instead of idling it.
        The scheduler sees each sampled token as a PLACEHOLDER until the host has it; a sequence that turns out
        to have finished wastes its row of the queued step (its KV goes to a freed, never-shared block)."""
        t_start = time.perf_counter()
        cur, self._inflight = self._inflight, None
        if cur is None:
            sched = self.scheduler.schedule()
            if sched.is_empty:
                return []
            cur = self._launch(sched, None, t_start)
        nxt = None
        if self.async_scheduling and self._may_continue(cur):
            try:
                nxt = self._launch_next(cur)
            except BaseException:
                if cur.got is not None:  # the placeholders get their tokens before the error goes up
                    self._complete(cur)
                raise
        outputs = self._complete(cur)
        self._inflight = nxt
        return outputs

    def _launch(self, sched: SchedulerOutput, prev: _Step | None, t_start: float) -> _Step:
        """Queues the model step and the sampling of `sched` on the device. prev: the step still in flight whose
        samples are this step's decode inputs (async scheduling)."""
        now = time.monotonic()
        owner = self._seq_owner
        # Decodes first (the ForwardBatch contract), then prefill chunks, each group in scheduling order.
        # Chunks hold the sequence's block table by reference: it is read when the step is queued, before
        # update/finish can change it.
        decodes: list[tuple[SeqChunk, Sequence]] = []
        prefills: list[tuple[SeqChunk, Sequence]] = []
        for it in sched.scheduled:
            seq = it.seq
            start = seq.num_computed_tokens
            end = start + it.num_new_tokens
            chunk = SeqChunk(seq.token_ids[start:end], start, seq.block_table, end == len(seq.token_ids),
                             (seq.seq_id, seq.num_preemptions))
            if end - start == 1 and start > 0:  # chunk.is_decode
                decodes.append((chunk, seq))
            else:
                if chunk.sample and seq.token_ids[-1] == PLACEHOLDER:
                    raise RuntimeError(f"seq {seq.seq_id}: a prefill chunk ends at a token not yet sampled")
                prefills.append((chunk, seq))
            if start == seq.num_cached_tokens:  # first scheduling of this sequence (or re-admission)
                metrics = owner[seq.seq_id][0].metrics
                if metrics.first_scheduled_time is None:
                    metrics.first_scheduled_time = now
                    metrics.num_cached_tokens = seq.num_cached_tokens
        work = decodes + prefills if decodes and prefills else (decodes or prefills)
        chunks = [c for c, _ in work]
        sample_seqs = [seq for c, seq in work if c.sample]
        sampling = self._sampling_batch(sample_seqs) if sample_seqs else None
        decode_ids = self._device_ids(decodes, prev) if decodes and prev is not None and prev.pending else None
        pending = self.runner.execute(chunks, sampling, decode_ids)
        penalties = sampling is not None and (sampling.flags.any_repetition or sampling.flags.any_freq_presence)
        return _Step(sched, len(decodes), len(prefills), sample_seqs, pending, penalties, t_start)

    @staticmethod
    def _device_ids(decodes: list[tuple[SeqChunk, Sequence]], prev: _Step) -> torch.Tensor | None:
        """Input ids [D] of the decode rows, on the device: prev's sample for the rows whose token is still a
        PLACEHOLDER, the host's token for the others. None when no row waits on prev."""
        src = prev.pending.out.token_ids  # [S] prev's samples, on the device
        rows = prev.sample_seqs
        if len(decodes) == len(rows) and all(seq is r for (_, seq), r in zip(decodes, rows)):
            return src  # steady decode: the same sequences in the same order
        index = {seq.seq_id: r for r, seq in enumerate(rows)}
        idx, host = [], []
        for chunk, seq in decodes:
            if chunk.token_ids[0] == PLACEHOLDER:
                idx.append(index[seq.seq_id])
            else:  # its token reached the host before prev (a decode that sat out prev)
                idx.append(len(rows) + len(host))
                host.append(chunk.token_ids[0])
        if len(host) == len(idx):
            return None
        if host:
            src = torch.cat([src, _upload(host, src.device)])
        return src[_upload(idx, src.device)]

    def _may_continue(self, cur: _Step) -> bool:
        """Whether the step after `cur` may be queued before cur's samples reach the host: not when the next step's
        sampler would read the token lists (penalties), nor when every sampled sequence is sure to stop now."""
        if cur.penalties:
            return False
        if cur.pending is None:  # prefill chunks that sample nothing: the next step needs no token of theirs
            return True
        owner, limit = self._seq_owner, self.max_model_len
        for seq in cur.sample_seqs:
            own = owner.get(seq.seq_id)
            if own is not None and seq.num_output_tokens + 1 < own[0].max_tokens and len(seq.token_ids) + 1 < limit:
                return True
        return False

    def _launch_next(self, cur: _Step) -> _Step | None:
        """Records cur in the scheduler with PLACEHOLDER tokens, schedules the next step and queues it."""
        cur.got = self.scheduler.update(cur.sched, dict.fromkeys((s.seq_id for s in cur.sample_seqs), PLACEHOLDER))
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return None
        self.step_stats["queued_ahead"] += 1
        return self._launch(sched, cur, time.perf_counter())

    def _complete(self, cur: _Step) -> list[RequestOutput]:
        """Waits for cur's samples and processes them: tokens, stops, outputs."""
        owner = self._seq_owner
        sampled: dict[int, int] = {}
        rows: dict[int, int] = {}
        if cur.pending is not None:
            tokens, chosen_lp, ranks = cur.pending.wait()
            sampled = dict(zip([seq.seq_id for seq in cur.sample_seqs], tokens))
            if ranks is not None:  # some row asked for logprobs
                top = cur.pending.out.top_logprobs
                rows = {seq.seq_id: r for r, seq in enumerate(cur.sample_seqs)}
        got = cur.got
        if got is not None:
            for seq in got:
                seq.token_ids[-1] = sampled[seq.seq_id]  # the PLACEHOLDER update() appended
        else:
            got = self.scheduler.update(cur.sched, sampled)
        touched: dict[str, Request] = {}
        now = time.monotonic()
        appended = 0
        for seq in got:
            own = owner.get(seq.seq_id)
            if own is None:
                continue
            req, state = own
            appended += 1
            if state.logprobs is not None:
                r = rows[seq.seq_id]
                self._append(req, state, seq.token_ids[-1], chosen_lp[r], top[r], ranks[r])
            else:
                self._append(req, state, seq.token_ids[-1], 0.0, None, None)
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            if not req.final_only or (state.finish_reason is not None and req.finished):
                touched[req.request_id] = req
        self.stats["generation_tokens_total"] += appended
        outputs = []
        for req in touched.values():
            if req.finished:
                req.metrics.finished_time = now
                self.requests.pop(req.request_id, None)
                for s in req.states:
                    owner.pop(s.seq.seq_id, None)
                self.stats["num_requests_finished"] += 1
            outputs.append(self._output(req))
        # A step's wall time: from its launch, or from the end of the step before when it was queued earlier.
        end = time.perf_counter()
        st, wall = self.step_stats, end - max(cur.t_start, self._t_last_complete)
        self._t_last_complete = end
        sched = cur.sched
        if self.step_trace is not None:
            self.step_trace.append(("prefill" if cur.num_prefills else "decode", sched.num_batched_tokens,
                                    cur.num_decodes + cur.num_prefills, wall))
        if cur.num_prefills:
            st["prefill_steps"] += 1
            st["prefill_tokens"] += sched.num_batched_tokens - cur.num_decodes
            st["prefill_s"] += wall
        else:
            st["decode_steps"] += 1
            st["decode_rows"] += cur.num_decodes
            st["decode_s"] += wall
        return outputs

    def _output(self, req: Request) -> RequestOutput:
        for st in req.states:
            if st.detok is None and st.num_detok >= 0:
                st.text = detokenize_output(self.tokenizer, req.prompt_token_ids,
                                            st.seq.output_token_ids[: st.num_detok],
                                            req.params.skip_special_tokens)
                if st.finish_reason is not None:
                    st.num_detok = -1  # final: no need to decode again
        return req.output()

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        """Steady decode reuses the last batch: same rows in the same order and nothing in it that changes from
        step to step (penalties read the token lists, min_tokens masks lift as outputs grow)."""
        key = [seq.seq_id for seq in seqs]
        cached = self._sampling_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        params, gens, masks = [], [], []
        owner = self._seq_owner
        any_mask = False
        for seq in seqs:
            req, state = owner[seq.seq_id]
            p = req.params
            params.append(p)
            gens.append(state.generator)
            # min_tokens: eos and stop token ids may not be sampled yet
            if seq.num_output_tokens < p.min_tokens:
                masks.append(sorted(req.stop_ids))
                any_mask = True
            else:
                masks.append([])
        penalties = any(p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                        for p in {id(p): p for p in params}.values())
        if penalties:
            outs, prompts = [s.output_token_ids for s in seqs], [s.prompt_token_ids for s in seqs]
        else:  # only the penalties read them
            outs = prompts = [()] * len(seqs)
        batch = SamplingBatch.from_params(params, outs, prompts, gens, masks, self.runner.device)
        self._sampling_cache = None if penalties or any_mask else (key, batch)
        return batch

    def _append(self, req: Request, st: SeqState, token: int, logprob: float, top, rank: int | None) -> None:
        p = req.params
        if st.logprobs is not None:
            entry = {t: Logprob(lp, rank + 1, self.tokenizer.decode([t], skip_special_tokens=False))
                     for rank, (t, lp) in enumerate(top or [])}
            if token not in entry:
                entry[token] = Logprob(logprob, rank, self.tokenizer.decode([token], skip_special_tokens=False))
            st.logprobs.append(entry)
            st.cumulative_logprob += logprob
        seq = st.seq
        n_tokens = len(seq.token_ids)
        n_out = n_tokens - seq.num_prompt_tokens
        can_stop = n_out >= p.min_tokens
        if can_stop and token in req.stop_ids:
            st.finish_reason = "stop"
            # The stop token's own text is not part of the output (vLLM's rule).
            st.stop_reason = token if token in (p.stop_token_ids or []) else None
        elif st.detok is None:
            st.num_detok += 1  # deferred: decoded at the end
        else:
            prev_len = len(st.text)
            st.text += st.detok.step([token])
            if can_stop and p.stop:
                self._check_stop_strings(st, p, prev_len)
        if st.finish_reason is None and (n_out >= req.max_tokens or n_tokens >= self.max_model_len):
            st.finish_reason = "length"
        if st.finish_reason is not None:
            self.scheduler.finish(seq, st.finish_reason)

    @staticmethod
    def _check_stop_strings(st: SeqState, p: SamplingParams, prev_len: int) -> None:
        longest = max(len(s) for s in p.stop)
        start = max(0, prev_len - longest + 1)
        hits = [(st.text.find(s, start), s) for s in p.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return
        i, s = min(hits)
        st.text = st.text[: i + len(s)] if p.include_stop_str_in_output else st.text[:i]
        st.finish_reason, st.stop_reason = "stop", s

    # ------------------------------------------------------------------ stats
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
            **self.stats,
        )
