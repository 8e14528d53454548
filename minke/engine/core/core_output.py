"""The engine core's output side: token ids only, no text.

It stands in for the OutputProcessor inside the core's LLMEngine (same interface: requests, owner, stats, add,
abort, fail, process), but does only what the scheduler needs and what cannot be done elsewhere: the token-level
stops (eos / stop_token_ids after min_tokens, max_tokens, the context length, a structured-output grammar that
terminated: the core's own matchers, advanced here, fill the next step's bitmask), and it files every sampled token of
the step, with its logprobs when asked, and the prompt-logprob rows scored in the step into one StepBatch per
front (messages.py). Detokenization, stop strings,
logprob token strings and RequestOutputs happen in the API process (front_output.py), which applies the same
token-level rules on the same tokens and ends there what a stop string ends (it tells the core: EngineCore.stop).
"""

from __future__ import annotations

import time

import numpy as np

from ..output_processor import StepSamples, end_request
from ..request import Request, SeqState
from ..sequence import Sequence
from .messages import StepBatch, encode_rows


class CoreOutputProcessor:
    def __init__(self, max_model_len: int):
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.owner: dict[int, tuple[Request, SeqState]] = {}  # seq_id -> its request and state
        self.stats = dict(prompt_tokens_total=0, generation_tokens_total=0, num_requests_finished=0)
        self.route: dict[str, tuple[int, int]] = {}  # request id -> (front id, the front's handle)
        self.batches: dict[int, StepBatch] = {}  # front id -> this step's output so far

    def batch(self, front: int) -> StepBatch:
        b = self.batches.get(front)
        if b is None:
            b = self.batches[front] = StepBatch()
        return b

    def take(self) -> dict[int, StepBatch]:
        out, self.batches = self.batches, {}
        return out

    # ------------------------------------------------------------------ requests
    def add(self, req: Request, front: int = 0, handle: int = 0) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.route[req.request_id] = (front, handle)
        for s in req.states:
            self.owner[s.seq.seq_id] = (req, s)
        self.stats["prompt_tokens_total"] += len(req.prompt_token_ids)

    def abort(self, request_id: str) -> tuple[None, list[Sequence]] | None:
        ended = self._end(request_id, "abort")
        return None if ended is None else (None, ended[1])

    def fail(self, request_id: str, error: str) -> tuple[None, list[Sequence]] | None:
        """The request's step failed alone (LLMEngine): its front is told (err), its sequences leave."""
        route = self.route.get(request_id)
        ended = self._end(request_id, "error")
        if ended is None:
            return None
        self.stats["num_requests_finished"] += 1
        self.batch(route[0]).err.append([route[1], error])
        return None, ended[1]

    def stop_seq(self, request_id: str, index: int) -> Sequence | None:
        """Ends sequence `index` of a request (a stop string matched in the front); the live sequence for the
        scheduler to drop, or None. The request leaves once every sequence has ended."""
        req = self.requests.get(request_id)
        if req is None or not 0 <= index < len(req.states):
            return None
        st = req.states[index]
        if st.finish_reason is not None:
            return None
        st.finish_reason = "stop"
        self.owner.pop(st.seq.seq_id, None)
        if req.finished:
            self._end(request_id, "stop")
            self.stats["num_requests_finished"] += 1
        return st.seq

    def _end(self, request_id: str, reason: str) -> tuple[Request, list[Sequence]] | None:
        self.route.pop(request_id, None)
        return end_request(self.requests, self.owner, request_id, reason)

    # ------------------------------------------------------------------ one step
    def process(self, step: StepSamples) -> tuple[list, list[tuple[Sequence, str]]]:
        """Files the step's tokens into the fronts' batches; returns ([], the sequences that finished)."""
        owner, route, limit = self.owner, self.route, self.max_model_len
        finished: list[tuple[Sequence, str]] = []
        now = time.monotonic()
        appended = 0
        if step.prompt:
            self._file_prompt_logprobs(step.prompt)
        failed: list[tuple[str, Exception]] = []
        for seq in step.seqs:
            own = owner.get(seq.seq_id)
            if own is None:  # aborted or stopped while its step ran
                continue
            req, st = own
            front, handle = route[req.request_id]
            b = self.batch(front)
            row = len(b.tokens)
            token = seq.token_ids[-1]
            b.handles.append(handle)
            b.indices.append(st.index)
            b.tokens.append(token)
            appended += 1
            if st.logprobs is not None:
                r = step.rows[seq.seq_id]
                b.lp[row] = [step.chosen_logprobs[r], step.ranks[r], step.top[r]]
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
                b.cached.append([handle, req.metrics.num_cached_tokens])
            # The token-level stops, as OutputProcessor._append decides them (the front decides them again).
            p = req.params
            n_tokens = len(seq.token_ids)
            n_out = n_tokens - seq.num_prompt_tokens
            if st.grammar is not None:
                try:
                    st.grammar.accept(token)
                except Exception as e:  # a token its grammar forbids: this request fails alone (as in-process)
                    failed.append((req.request_id, e))
                    continue
            if st.grammar is not None and st.grammar.terminated:
                # The grammar is complete (it allowed only stop tokens): whole, whatever ignore_eos / min_tokens say.
                st.finish_reason = "stop"
                st.stop_reason = token if token in (p.stop_token_ids or []) else None
            elif n_out >= p.min_tokens and token in req.stop_ids:
                st.finish_reason = "stop"
                st.stop_reason = token if token in (p.stop_token_ids or []) else None
            elif n_out >= req.max_tokens or n_tokens >= limit:
                st.finish_reason = "length"
            if st.finish_reason is not None:
                finished.append((seq, st.finish_reason))
                b.fin.append([row, st.finish_reason, st.stop_reason])
                owner.pop(seq.seq_id, None)
                if req.finished:
                    self.requests.pop(req.request_id, None)
                    route.pop(req.request_id, None)
                    req.metrics.finished_time = now
                    self.stats["num_requests_finished"] += 1
        self.stats["generation_tokens_total"] += appended
        for rid, e in failed:
            got = self.fail(rid, f"{type(e).__name__}: {e}")
            if got is not None:
                finished.extend((s, "abort") for s in got[1])  # the scheduler frees them
        return [], finished

    def _file_prompt_logprobs(self, rows: list[tuple[int, int, tuple]]) -> None:
        """rows: StepSamples.prompt, (seq_id, first position, numpy (logprobs, ranks, top ids, top logprobs)); each
        goes to its front as [handle, first, k', and the four arrays' raw bytes] (messages.py: plp), which files them
        into its request's arrays as in-process."""
        owner, route = self.owner, self.route
        for seq_id, first, (lps, ranks, ids, tops) in rows:
            own = owner.get(seq_id)
            if own is None:  # aborted while its step ran
                continue
            front, handle = route[own[0].request_id]
            self.batch(front).plp.append([handle, first, ids.shape[1], encode_rows(lps, np.float32),
                                          encode_rows(ranks, np.int64), encode_rows(ids, np.int64),
                                          encode_rows(tops, np.float32)])
