"""Continuous-batching scheduler (vLLM v1 style) over a paged KV cache; pure Python, no tensors.

Each step has one token budget (max_num_batched_tokens) shared by every scheduled sequence:
  1. running sequences first, in admission order: each asks for num_tokens - num_computed_tokens tokens
     (1 when decoding, the rest of its prompt for a chunked prefill, clipped to the remaining budget when chunked
     prefill is on). When KV blocks run short, the last-admitted running sequence is preempted by recompute
     (blocks freed, progress reset, put back at the front of `waiting`); a sequence that would have to preempt
     itself is preempted itself.
  2. then, only if nothing was preempted this step, waiting sequences in FCFS order while budget, seq slots
     (max_num_seqs) and blocks allow. Prefix-cache hits skip part of the prefill. The head of `waiting` blocks
     everyone behind it (strict FCFS), which also lets a preempted sequence resume before newer ones.
A resumed sequence recomputes prompt + generated tokens (its token_ids already contain its outputs), minus
whatever the prefix cache still holds.

mixed_batches=False (what the engine picks when decode steps replay CUDA graphs) keeps prefill and decode in
separate steps, as SGLang does by default and vLLM v0 did: while a running sequence is mid-prefill or a waiting one
can be admitted, the step holds prefill work only (the same two phases above, decodes skipped); otherwise it holds
every decode. A mixed step runs eagerly (a graph covers one-token rows only), so at large batch it costs several
times a graphed decode step; separate steps keep every decode on the graph. The price is decodes waiting out a
prefill step (inter-token latency during admission bursts). Under load (a quarter of max_num_seqs decoding) new
requests are admitted in batches: a prefill step waits until it can admit prefill_batch_tokens prompt tokens, or at
most max_prefill_delay_steps decode steps. With mixed_chunk_min_tokens, a prefill step at least that large also
runs the decodes that fit (no allocation for them): such a step is eager anyway, and they need not wait it out.

What decode latency (TPOT) can and cannot gain from the step settings. With C sequences running and each request
bringing P prompt tokens per O output tokens, a steady state admits about C * P / O prompt tokens per decode step
(one request ends, one is admitted), so TPOT is about a decode step plus the time of those prefill tokens, however
they are cut up (issue 21's workload, C 256, P 512, O 256: 512 prefill tokens a step). mixed_chunk_min_tokens can
take the decode step that follows each large prefill step out of that sum. The other knobs move the stalls, not
their sum: a smaller max_num_batched_tokens (or long_prefill_token_threshold, which caps one sequence's chunk,
vLLM's meaning) gives shorter, more frequent prefill steps: a lower ITL p99 for running requests, a longer TTFT for
a burst of new ones (the backlog is admitted in smaller steps), and each prefill step pays its fixed cost more
often. Otherwise only running fewer sequences (max_num_seqs; throughput falls) or a cheaper prefill lowers
steady-state TPOT; a benchmark's TPOT below it comes from phases without admissions (requests that started
together).

The engine drives it: out = schedule(); run the model on out.scheduled; update(out, sampled); then for each seq
that got a token decide eos / stop / max_tokens and call finish(seq, reason).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass

from minke.engine.block_manager import BlockManager
from minke.engine.sequence import FINISH_REASONS, Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    _: dataclasses.KW_ONLY
    max_model_len: int
    mixed_batches: bool = True  # False: prefill and decode in separate steps (module docstring)
    # Separate steps under load (at least max_num_seqs // 4 sequences decoding): a prefill step for new requests is
    # started only once the requests it could admit bring prefill_batch_tokens prompt tokens (None: half of
    # max_num_batched_tokens), or after max_prefill_delay_steps decode steps. Otherwise every finishing request
    # would cost one small prefill step with the whole batch's decodes stalled (offline runs: ~2 per decode step).
    prefill_batch_tokens: int | None = None
    max_prefill_delay_steps: int = 16
    # Separate steps: a prefill step of at least this many tokens also runs the decodes whose blocks already hold
    # their next token, within the budget left, so they get a token instead of waiting it out. The step is eager
    # (as any prefill over the prefill-graph buckets or with cached context already is): worth it only above them.
    # 0 = never (prefill-only steps).
    mixed_chunk_min_tokens: int = 0
    # vLLM's long_prefill_token_threshold: the most prompt tokens one sequence computes in a step (its prefill is
    # chunked to this size even when the step's budget has room); 0 = no cap, the step budget alone. Needs chunked
    # prefill. The trade-off is in the module docstring.
    long_prefill_token_threshold: int = 0
    # LoRA: the most distinct adapters among running sequences (so one step never mixes more than the runner's
    # device slots); a waiting sequence of another adapter waits until one ends (FCFS). 0 = no limit.
    max_loras: int = 0

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.mixed_chunk_min_tokens < 0:
            raise ValueError(f"SchedulerConfig.mixed_chunk_min_tokens must be >= 0 (0: never), got "
                             f"{self.mixed_chunk_min_tokens}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"SchedulerConfig.long_prefill_token_threshold must be >= 0 (0: no cap), got "
                             f"{self.long_prefill_token_threshold}")
        if self.long_prefill_token_threshold and not self.enable_chunked_prefill:
            raise ValueError("SchedulerConfig: long_prefill_token_threshold chunks prompts, so it needs "
                             "enable_chunked_prefill=True")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"SchedulerConfig: without chunked prefill a whole prompt must fit in one step, so "
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}); raise it or set enable_chunked_prefill=True"
            )


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens to compute this step, starting at seq.num_computed_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        capacity = block_manager.num_blocks * block_manager.block_size
        if capacity < config.max_model_len:
            # Otherwise one long sequence could never fit even alone and would preempt itself forever.
            raise ValueError(
                f"Scheduler: KV cache holds {capacity} tokens ({block_manager.num_blocks} blocks x "
                f"{block_manager.block_size}) < max_model_len {config.max_model_len}; give the cache more memory "
                "or lower max_model_len"
            )
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order; the last one is preempted first
        self.num_preemptions_total = 0
        self._prefill_delayed = 0  # decode steps taken since a prefill step for waiting requests was first possible
        # Step-failure recovery (LLMEngine): while set, steps hold only these sequences (isolate()).
        self.isolated: frozenset[int] | None = None

    # ---------------------------------------------------------------- queue management
    def add(self, seq: Sequence) -> None:
        if seq.block_size != self.block_manager.block_size:
            raise ValueError(
                f"add: seq {seq.seq_id} has block_size {seq.block_size}, the KV cache uses "
                f"{self.block_manager.block_size}"
            )
        if seq.num_tokens > self.config.max_model_len:
            raise ValueError(
                f"add: seq {seq.seq_id} has {seq.num_tokens} prompt tokens > max_model_len {self.config.max_model_len}"
            )
        if seq.status != SequenceStatus.WAITING or seq.block_table:
            raise ValueError(f"add: seq {seq.seq_id} must be a new WAITING sequence without blocks, got {seq!r}")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, seq: Sequence, reason: str) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, seq_id: int) -> Sequence | None:
        """Remove a waiting or running sequence, free its blocks; None if no such unfinished sequence."""
        for i, seq in enumerate(self.running):
            if seq.seq_id == seq_id:
                del self.running[i]
                self._release(seq, "abort")
                return seq
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                self._release(seq, "abort")
                return seq
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish: reason must be one of {FINISH_REASONS}, got {reason!r}")
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:
            raise ValueError(f"finish: seq {seq.seq_id} is not scheduled here (already finished?)")
        self._release(seq, reason)

    def _preempt(self, seq: Sequence) -> None:
        """Preempt by recompute: drop its KV, it restarts from the prefix cache / scratch when readmitted."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(seq)

    def reset(self, seqs: list[Sequence]) -> None:
        """Step-failure recovery: the unfinished ones of `seqs` lose their KV and progress (recompute, as a
        preemption) and go to the front of `waiting`, in the given order. Not counted as preemptions."""
        keep = [s for s in seqs if s.status != SequenceStatus.FINISHED]
        ids = {id(s) for s in keep}
        self.running = [s for s in self.running if id(s) not in ids]
        self.waiting = deque(s for s in self.waiting if id(s) not in ids)
        for seq in keep:
            self.block_manager.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
            seq.num_preemptions += 1  # a new block-table key for the runner's persistent copies
        self.waiting.extendleft(reversed(keep))

    def isolate(self, seq_ids) -> None:
        """Until isolate(None): each step holds only these sequences (others wait; running ones are preempted
        when their blocks are needed). The engine runs a suspect request alone this way."""
        self.isolated = None if seq_ids is None else frozenset(seq_ids)

    def _schedule_isolated(self) -> SchedulerOutput:
        iso = self.isolated
        preempted: list[Sequence] = []
        while True:
            others_run = [s for s in self.running if s.seq_id not in iso]
            others_wait = [s for s in self.waiting if s.seq_id not in iso]
            self.running = [s for s in self.running if s.seq_id in iso]
            self.waiting = deque(s for s in self.waiting if s.seq_id in iso)
            try:
                out = self._schedule(prefill=True, decode=True)
            finally:
                self.running = others_run + self.running
                self.waiting.extend(others_wait)
            preempted += out.preempted
            if out.scheduled or not others_run:
                return SchedulerOutput(out.scheduled, preempted, out.num_batched_tokens)
            victim = others_run[-1]  # blocks short: make room with the last-admitted other sequence
            self._preempt(victim)
            preempted.append(victim)

    # ---------------------------------------------------------------- one step
    def schedule(self) -> SchedulerOutput:
        if self.isolated is not None:
            return self._schedule_isolated()
        if self.config.mixed_batches:
            return self._schedule(prefill=True, decode=True)
        if self._has_prefill_work():
            out = self._schedule(prefill=True, decode=False)
            if out.scheduled:
                return self._ride_along(out)
            # Its sequences preempted themselves (blocks short): decode what is left, report both preemptions.
            rest = self._schedule(prefill=False, decode=True)
            return SchedulerOutput(rest.scheduled, out.preempted + rest.preempted, rest.num_batched_tokens)
        return self._schedule(prefill=False, decode=True)

    def _ride_along(self, out: SchedulerOutput) -> SchedulerOutput:
        """A prefill-only step of at least mixed_chunk_min_tokens tokens, plus the running decodes that fit the
        budget left and need no new block (nothing is allocated or preempted for them: the others wait)."""
        cfg = self.config
        if not cfg.mixed_chunk_min_tokens or out.preempted or out.num_batched_tokens < cfg.mixed_chunk_min_tokens:
            return out
        budget = cfg.max_num_batched_tokens - out.num_batched_tokens
        bs = self.block_manager.block_size
        taken = {id(x.seq) for x in out.scheduled}
        extra = []
        for seq in self.running:
            if budget == 0:
                break
            if (len(seq.token_ids) - seq.num_computed_tokens == 1 and id(seq) not in taken
                    and seq.num_computed_tokens < len(seq.block_table) * bs):
                extra.append(ScheduledSeq(seq, 1))
                budget -= 1
        if not extra:
            return out
        return SchedulerOutput(out.scheduled + extra, out.preempted, out.num_batched_tokens + len(extra))

    def _has_prefill_work(self) -> bool:
        if any(len(s.token_ids) - s.num_computed_tokens != 1 for s in self.running):  # some sequence mid-prefill
            return True
        cfg = self.config
        if not self.waiting or len(self.running) >= cfg.max_num_seqs:
            return False
        seq, budget = self.waiting[0], cfg.max_num_batched_tokens
        remaining = seq.num_tokens - self.block_manager.lookup_prefix(seq)
        if remaining > budget and not cfg.enable_chunked_prefill:
            return False
        if not self.block_manager.can_admit(seq, self._chunk(min(remaining, budget))):
            return False
        if not self._lora_admits(seq, self._running_loras()):
            return False
        if len(self.running) >= max(cfg.max_num_seqs // 4, 1) and self._prefill_delayed < cfg.max_prefill_delay_steps:
            # Under load: gather admissions into fewer, larger prefill steps (SchedulerConfig.prefill_batch_tokens).
            want = cfg.prefill_batch_tokens or budget // 2
            slots, tokens = cfg.max_num_seqs - len(self.running), 0
            for i, w in enumerate(self.waiting):
                if i >= slots or tokens >= want:
                    break
                tokens += self._chunk(w.num_tokens - w.num_computed_tokens)
            if tokens < want:
                self._prefill_delayed += 1
                return False
        self._prefill_delayed = 0
        return True

    def _chunk(self, n: int) -> int:
        """A prefill's tokens this step, capped at long_prefill_token_threshold."""
        cap = self.config.long_prefill_token_threshold
        return cap if 0 < cap < n else n

    def _running_loras(self) -> set[int]:
        return {s.lora_int_id for s in self.running if s.lora_int_id} if self.config.max_loras else set()

    def _lora_admits(self, seq: Sequence, loras: set[int]) -> bool:
        """Whether admitting seq keeps the running sequences' distinct adapters within max_loras."""
        lid = seq.lora_int_id
        return not self.config.max_loras or not lid or lid in loras or len(loras) < self.config.max_loras

    def _schedule(self, prefill: bool, decode: bool) -> SchedulerOutput:
        """One step over running sequences of the chosen kinds (prefill chunks and/or decodes), then, when prefill
        is on, waiting ones."""
        cfg = self.config
        bm = self.block_manager
        bs = bm.block_size
        budget = cfg.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        # 1) running sequences, admission order. Victims are taken from the end of `running`, i.e. from
        #    sequences not yet scheduled this step (or the current one itself), so scheduled work is never undone.
        i = 0
        running = self.running  # preemption removes from this very list, hence the index loop
        while i < len(running) and budget > 0:
            seq = running[i]
            n = len(seq.token_ids) - seq.num_computed_tokens
            assert n >= 1, f"running seq {seq.seq_id} has nothing to compute: {seq!r}"
            if not (decode if n == 1 else prefill):
                i += 1  # the other kind of step
                continue
            n = self._chunk(n)
            if n > budget:
                if not cfg.enable_chunked_prefill:
                    i += 1  # whole remainder or nothing
                    continue
                n = budget
            if seq.num_computed_tokens + n <= len(seq.block_table) * bs:
                # Its blocks already cover the step (most decode steps): nothing to allocate or preempt.
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
                continue
            while not bm.can_allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break  # it preempted itself: it was the last running sequence
            bm.allocate(seq, n)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1

        # 2) waiting sequences, strict FCFS. Skipped after a preemption: blocks are short, admitting would thrash.
        loras = self._running_loras()
        while prefill and not preempted and self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            if not self._lora_admits(seq, loras):
                break
            remaining = self._chunk(seq.num_tokens - bm.lookup_prefix(seq))
            if remaining > budget:
                if not cfg.enable_chunked_prefill:
                    break
                n = budget
            else:
                n = remaining
            if not bm.can_admit(seq, n):
                break
            self.waiting.popleft()
            bm.allocate_prefix(seq)
            bm.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            if seq.lora_int_id:
                loras.add(seq.lora_int_id)

        return SchedulerOutput(scheduled, preempted, cfg.max_num_batched_tokens - budget)

    def update(self, out: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Record a finished model step. `sampled[seq_id]` is needed for every seq whose computed count reaches
        num_tokens this step (finished prefill, or decode); samples for mid-prefill chunks are ignored.
        Returns the sequences that got a new token, in scheduling order."""
        got_token: list[Sequence] = []
        bm = self.block_manager
        bs, caching = bm.block_size, bm.enable_prefix_caching
        for item in out.scheduled:
            seq = item.seq
            if seq.status != SequenceStatus.RUNNING:
                continue  # aborted between schedule() and update(): its blocks are already freed
            computed = seq.num_computed_tokens = seq.num_computed_tokens + item.num_new_tokens
            tokens = seq.token_ids
            if computed > len(tokens):
                raise RuntimeError(f"update: seq {seq.seq_id} computed past its tokens: {seq!r}")
            if caching and computed // bs > seq.num_committed_blocks:
                bm.commit(seq)  # a block became full (commit itself returns early otherwise)
            if computed == len(tokens):
                token = sampled.get(seq.seq_id)
                if token is None:
                    raise KeyError(f"update: no sampled token for seq {seq.seq_id}, which finished its step")
                tokens.append(token)  # seq.append_token, inlined
                got_token.append(seq)
        return got_token
