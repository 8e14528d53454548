"""The model steps in flight: schedule -> build the step's chunks and sampling batch -> queue it on the runner ->
hand back its samples. With async scheduling (vLLM's flag) one step is kept queued ahead of the host: before
waiting for step k's samples, step k+1 is scheduled and queued behind it on the GPU, its decode rows reading step
k's samples on the device, so the host work between steps (outputs of k, scheduling and inputs of k+1) overlaps
the GPU instead of idling it. The scheduler sees each sampled token as a PLACEHOLDER until the host has it; a
sequence that turns out to have finished wastes its row of the queued step (its KV goes to a freed block that is
never shared: the block of that position is uncommitted).

Structured outputs: a step with grammar-constrained rows queues its forward first and its sampler later, once
the rows' token bitmask is filled on the CPU (xgrammar), so the fill overlaps the forward on the GPU (vLLM splits
execute_model / sample_tokens for the same reason). The mask of step k+1 needs step k's tokens in the matchers:
under async scheduling step k+1's forward is queued ahead as usual, and its mask is filled and its sampler queued
right after step k's samples were processed (matchers advanced), while step k+1's forward still runs; the step is
only handed on (and step k+2 queued) once its sampler is queued, so the logits it reads (a CUDA graph's output
buffer) are never overwritten first."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..runner.input_batch import SeqChunk
from ..runner.prompt_logprobs import PromptLogprobs
from ..runner.runner import PendingSample, Runner
from ..runner.sampler import SamplingBatch
from .output_processor import StepSamples
from .request import Request, SeqState
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence, SequenceStatus
from .structured_output import StructuredOutputManager

PLACEHOLDER = -1  # a sequence's last token while the step that samples it runs ahead of the host (async scheduling)


def _upload(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 [len(values)] on device without waiting for the stream (a blocking copy would wait for the step
    queued ahead); the pageable source is staged before the call returns."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


class StepFailure(Exception):
    """A model step failed. seqs: the sequences of the step(s) that were in flight, in scheduling order (the
    suspects); error: the exception raised. The steps in flight are already dropped (StepPipeline._drop)."""

    def __init__(self, seqs: list[Sequence], error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.seqs, self.error = seqs, error


@dataclass
class _Step:
    """A model step queued on the device, until its samples are collected (StepPipeline._collect)."""

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
    # Async scheduling: scheduled, but not queued, because its sampler needs token lists (penalties) that still
    # end in a PLACEHOLDER; queued once the step before is collected (StepPipeline.step).
    deferred: bool = False
    # Prompt logprobs: (sequence, lo, hi) per chunk whose positions lo..hi-1 are scored, in chunk order.
    prompt_rows: list[tuple[Sequence, int, int]] | None = None
    # Structured outputs: the forward is queued, its sampling waits for the grammar bitmask (StepPipeline._sample).
    logits: torch.Tensor | None = None  # [S, V] on the device, being computed
    sampling: SamplingBatch | None = None
    forward_done: torch.cuda.Event | None = None  # recorded behind the forward (CUDA): was the mask ready first?
    prompt: PromptLogprobs | None = None  # the forward's prompt logprobs, handed to the sampler's PendingSample


class StepPipeline:
    """owner: seq_id -> (Request, SeqState) of the requests in flight (the OutputProcessor's map, read only)."""

    def __init__(self, scheduler: Scheduler, runner: Runner, owner: dict[int, tuple[Request, SeqState]],
                 max_model_len: int, async_scheduling: bool, structured: StructuredOutputManager | None = None):
        self.scheduler, self.runner, self.owner, self.structured = scheduler, runner, owner, structured
        self.max_model_len, self.async_scheduling = max_model_len, async_scheduling
        self.inflight: _Step | None = None  # async scheduling: the step queued ahead
        self._sampling_cache: tuple[list[int], SamplingBatch] | None = None
        self._t_last_complete = 0.0
        # Where the steps' time goes (benchmarks): steps of each kind, their rows / tokens and wall seconds (a step
        # ends with the sampled tokens on the host, so its wall time covers the GPU work too).
        self.step_stats = dict(decode_steps=0, decode_rows=0, decode_s=0.0, prefill_steps=0, prefill_tokens=0,
                               prefill_s=0.0, queued_ahead=0,  # queued_ahead: steps queued by async scheduling
                               # structured outputs: steps with a grammar bitmask, those whose mask was filled
                               # before the GPU finished the forward (CUDA only), and the host seconds of filling
                               mask_steps=0, mask_ready_early=0, mask_fill_s=0.0)
        self.step_trace: list[tuple[str, int, int, float]] | None = None  # a list: (kind, tokens, seqs, s) per step

    def step(self, process: Callable[[StepSamples], None]) -> bool:
        """Runs one step to its samples and hands them to `process` (the engine's output side), queuing the next
        step first under async scheduling. Returns False when there was nothing to run. A failure anywhere in the
        model step (scheduling, inputs, forward, sampling, collecting) drops the steps in flight and raises
        StepFailure naming their sequences (`_drop`); the engine then finds the request at fault."""
        t_start = time.perf_counter()
        cur, self.inflight = self.inflight, None
        nxt = None
        try:
            if cur is None:
                sched = self.scheduler.schedule()
                if sched.is_empty:
                    return False
                cur = self._launch(sched, None, t_start)
            if self.async_scheduling and self._may_continue(cur):
                nxt = self._launch_next(cur)
            samples = self._collect(cur)
        except Exception as e:  # zero cost on the normal path (Python 3.11 exceptions)
            raise self._drop(e, cur, nxt) from e
        process(samples)
        self._record(cur)  # after `process`: a step's wall time covers its outputs too
        if nxt is not None and nxt.logits is not None:  # its grammars have now seen cur's tokens
            try:
                self._sample_masked(nxt)
            except Exception as e:
                raise self._drop(StepFailure([it.seq for it in nxt.sched.scheduled], e), None, None) from e
        if nxt is not None and nxt.deferred:
            try:
                nxt = self._launch_deferred(nxt)
            except Exception as e:
                raise self._drop(e, None, None) from e
        self.inflight = nxt
        return True

    def _drop(self, e: Exception, cur: _Step | None, nxt: _Step | None) -> "StepFailure":
        """Forgets the steps in flight after a failure: the PLACEHOLDER tokens that async scheduling appended for
        cur's samples are removed (those samples never reach the host) and the reusable sampling batch is
        discarded. The returned StepFailure names every sequence of those steps (the suspects), in scheduling
        order; their scheduler progress is left for the engine to reset (Scheduler.reset)."""
        seqs: list[Sequence] = list(e.seqs) if isinstance(e, StepFailure) else []
        for st in (cur, nxt):
            if st is not None:
                seqs.extend(it.seq for it in st.sched.scheduled)
        if cur is not None and cur.got:
            for seq in cur.got:
                if seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:
                    seq.token_ids.pop()
        self._sampling_cache = None
        error = e.error if isinstance(e, StepFailure) else e
        return StepFailure(list({s.seq_id: s for s in seqs}.values()), error)

    # ------------------------------------------------------------------ launching
    def _launch(self, sched: SchedulerOutput, prev: _Step | None, t_start: float) -> _Step:
        """Queues the model step and the sampling of `sched` on the device. prev: the step still in flight whose
        samples are this step's decode inputs (async scheduling). A failure names sched's sequences."""
        try:
            return self._queue(sched, prev, t_start)
        except Exception as e:
            raise StepFailure([it.seq for it in sched.scheduled], e) from e

    def _queue(self, sched: SchedulerOutput, prev: _Step | None, t_start: float) -> _Step:
        now = time.monotonic()
        owner = self.owner
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
                             (seq.seq_id, seq.num_preemptions), seq.lora_int_id)
            if seq.wants_prompt_logits:
                lo, hi = seq.prompt_logit_range(start, end)
                if hi > lo:  # position p's logits score prompt token p + 1
                    chunk.logit_targets, chunk.logits_at = seq.token_ids[lo + 1: hi + 1], lo - start
                    chunk.logits_topk = owner[seq.seq_id][0].params.prompt_logprobs
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
        sampling = self._sampling_batch(sample_seqs, prev is not None) if sample_seqs else None
        if sampling is None and sample_seqs:  # penalties read tokens prev has not delivered yet
            return _Step(sched, len(decodes), len(prefills), sample_seqs, None, True, t_start, deferred=True)
        decode_ids = (self._device_ids(decodes, prev)
                      if decodes and prev is not None and prev.pending and prev.pending.out is not None else None)
        prompt_rows = [(seq, c.start_pos + c.logits_at, c.start_pos + c.logits_at + c.num_prompt_logits)
                       for c, seq in work if c.logit_targets] or None
        penalties = sampling is not None and (sampling.flags.any_repetition or sampling.flags.any_freq_presence)
        if sampling is not None and any(owner[s.seq_id][1].grammar is not None for s in sample_seqs):
            logits, prompt = self.runner.forward(chunks, decode_ids)
            step = _Step(sched, len(decodes), len(prefills), sample_seqs, None, penalties, t_start,
                         prompt_rows=prompt_rows, logits=logits, sampling=sampling, prompt=prompt)
            if step.logits.is_cuda:
                step.forward_done = torch.cuda.Event()
                step.forward_done.record()
            if prev is None:  # every row's grammar has seen its last token: fill now, while the forward runs
                self._sample_masked(step)
            return step
        pending = self.runner.execute(chunks, sampling, decode_ids)
        return _Step(sched, len(decodes), len(prefills), sample_seqs, pending, penalties, t_start,
                     prompt_rows=prompt_rows)

    def _sample_masked(self, step: _Step) -> None:
        """Fills the grammar bitmask of step's rows (their matchers hold every token sampled before this step) and
        queues the sampler behind the forward. A row whose request ended meanwhile is left unconstrained (its
        token is dropped)."""
        t = time.perf_counter()
        owner = self.owner
        grammars = [own[1].grammar if (own := owner.get(s.seq_id)) is not None else None for s in step.sample_seqs]
        mask = self.structured.fill_bitmask(grammars)
        st = self.step_stats
        st["mask_steps"] += 1
        st["mask_fill_s"] += time.perf_counter() - t
        if step.forward_done is not None and not step.forward_done.query():
            st["mask_ready_early"] += 1
        step.pending = self.runner.sample(step.logits, step.sampling, mask, prompt=step.prompt)
        step.logits = step.sampling = step.forward_done = step.prompt = None

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
        sampler would read the token lists (penalties), nor when every sampled sequence is sure to stop now and no
        request waits. Prompts waiting are work that needs none of cur's tokens: a batch of max_tokens=1 requests
        (scoring, prompt logprobs) would otherwise leave the GPU idle through the host's side of every step, for
        the price of one wasted decode row per sequence that stops."""
        if cur.penalties:
            return False
        if cur.pending is None or cur.pending.out is None:  # prefill chunks that sample nothing: the next step
            return True                                      # needs no token of theirs
        if self.scheduler.waiting:
            return True
        owner, limit = self.owner, self.max_model_len
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

    def _launch_deferred(self, step: _Step) -> _Step | None:
        """Queues a deferred step now that the tokens it reads are on the host, without the sequences that
        finished meanwhile."""
        sched = step.sched
        sched.scheduled = [it for it in sched.scheduled if it.seq.status == SequenceStatus.RUNNING]
        if not sched.scheduled:
            return None
        return self._launch(sched, None, step.t_start)

    def _sampling_batch(self, seqs: list[Sequence], ahead: bool = False) -> SamplingBatch | None:
        """Steady decode reuses the last batch: same rows in the same order and nothing in it that changes from
        step to step (penalties read the token lists, min_tokens masks lift as outputs grow). ahead: queued
        before the step in flight is collected; None then when penalties need a token still a PLACEHOLDER."""
        key = [seq.seq_id for seq in seqs]
        cached = self._sampling_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        params, gens, masks = [], [], []
        owner = self.owner
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
            if ahead and any(s.token_ids[-1] == PLACEHOLDER for s in seqs):
                return None
            outs, prompts = [s.output_token_ids for s in seqs], [s.prompt_token_ids for s in seqs]
        else:  # only the penalties read them
            outs = prompts = [()] * len(seqs)
        batch = SamplingBatch.from_params(params, outs, prompts, gens, masks, self.runner.device)
        self._sampling_cache = None if penalties or any_mask else (key, batch)
        return batch

    # ------------------------------------------------------------------ collecting
    def _collect(self, cur: _Step) -> StepSamples:
        """Waits for cur's samples and records them in the scheduler."""
        sampled: dict[int, int] = {}
        out = StepSamples([])
        if cur.pending is not None:
            tokens, chosen_lp, ranks = cur.pending.wait()
            sampled = dict(zip([seq.seq_id for seq in cur.sample_seqs], tokens))
            if ranks is not None:  # some row asked for logprobs
                out.rows = {seq.seq_id: r for r, seq in enumerate(cur.sample_seqs)}
                out.chosen_logprobs, out.top, out.ranks = chosen_lp, cur.pending.out.top_logprobs, ranks
            if cur.prompt_rows:
                out.prompt = self._prompt_logprobs(cur.prompt_rows, cur.pending.prompt_results())
        got = cur.got
        if got is not None:
            for seq in got:
                seq.token_ids[-1] = sampled[seq.seq_id]  # the PLACEHOLDER update() appended
        else:
            got = self.scheduler.update(cur.sched, sampled)
        out.seqs = got
        return out

    @staticmethod
    def _prompt_logprobs(rows: list[tuple[Sequence, int, int]], res) -> list[tuple[int, int, tuple]]:
        """Splits the step's scored rows by sequence: (seq_id, first position, (logprobs, ranks, top ids, top
        logprobs) of its rows: numpy views of the step's host copies), and records in each sequence that these
        positions are done."""
        lps, ranks, ids, tops = res
        out, at = [], 0
        for seq, lo, hi in rows:
            n = hi - lo
            out.append((seq.seq_id, lo, (lps[at:at + n], ranks[at:at + n], ids[at:at + n], tops[at:at + n])))
            seq.prompt_logits_next = max(seq.prompt_logits_next, hi)
            at += n
        return out

    def _record(self, cur: _Step) -> None:
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
