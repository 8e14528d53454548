"""Requests out: each step's sampled tokens become text (incremental detokenization), logprobs, stops and
`RequestOutput`s, built only for the requests that changed (vLLM v1's OutputProcessor). Owns the requests in
flight; tells the engine which sequences finished, so that the scheduler frees them."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..sampling_params import SamplingParams
from ..tokenizer import Tokenizer, detokenize_output
from .outputs import Logprob, RequestOutput
from .request import Request, SeqState
from .sequence import Sequence


@dataclass
class StepSamples:
    """What a finished model step sampled, for OutputProcessor.process. seqs: the sequences that got a token this
    step (the scheduler's update order), their new token already appended. rows / chosen_logprobs / top / ranks:
    only when some row asked for logprobs (rows maps seq_id -> sampler row)."""

    seqs: list[Sequence]
    rows: dict[int, int] | None = None
    chosen_logprobs: list[float] | None = None
    top: list | None = None  # per row: [(token, logprob), ...] best first
    ranks: list[int] | None = None
    # prompt logprobs scored this step: (seq_id, first position, (logprobs [R], ranks [R], top ids [R, k'], top
    # logprobs [R, k'])), numpy arrays of the rows of positions first.. (each scores the prompt token after it;
    # k' >= the request's k: the step's largest)
    prompt: list[tuple[int, int, tuple]] | None = None


def end_request(requests: dict[str, Request], owner: dict[int, tuple[Request, SeqState]], request_id: str,
                reason: str) -> tuple[Request, list[Sequence]] | None:
    """Takes the request out of flight (`requests` and every sequence's `owner` entry): (it, its unfinished sequences,
    now ended with `reason`), or None if it is not in flight. Shared with the engine core's output side."""
    req = requests.pop(request_id, None)
    if req is None:
        return None
    live = []
    for s in req.states:
        if s.finish_reason is None:
            live.append(s.seq)
            s.finish_reason = reason
        owner.pop(s.seq.seq_id, None)
    req.metrics.finished_time = time.monotonic()
    return req, live


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int):
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.requests: dict[str, Request] = {}
        self.owner: dict[int, tuple[Request, SeqState]] = {}  # seq_id -> its request and state
        self.stats = dict(prompt_tokens_total=0, generation_tokens_total=0, num_requests_finished=0)
        self._token_text: dict[int, str] = {}  # token id -> its text alone (logprob entries' decoded_token)

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        for s in req.states:
            self.owner[s.seq.seq_id] = (req, s)
        if req.prompt_logprobs is not None:
            req.prompt_logprobs.decode = self._text  # the entries' decoded_token, built when read
        self.stats["prompt_tokens_total"] += len(req.prompt_token_ids)

    def abort(self, request_id: str) -> tuple[RequestOutput, list[Sequence]] | None:
        """The aborted request's last output, and its unfinished sequences (for the scheduler to drop)."""
        ended = self._end(request_id, "abort")
        return None if ended is None else (self.output(ended[0]), ended[1])

    def fail(self, request_id: str, error: str) -> tuple[RequestOutput, list[Sequence]] | None:
        """Ends a request that the engine could not serve (its step fails alone: LLMEngine): its unfinished
        sequences end with finish_reason "error" (vLLM's FinishReason.ERROR) and its output carries `error`.
        Returns that output and the sequences for the scheduler to drop; None if the request is not in flight."""
        ended = self._end(request_id, "error")
        if ended is None:
            return None
        req, live = ended
        self.stats["num_requests_finished"] += 1
        try:
            out = self.output(req)
        except Exception:  # the text is what failed: report the tokens without it
            out = req.output()
        out.error = error
        return out, live

    def _end(self, request_id: str, reason: str) -> tuple[Request, list[Sequence]] | None:
        return end_request(self.requests, self.owner, request_id, reason)

    def process(self, step: StepSamples) -> tuple[list[RequestOutput], list[tuple[Sequence, str]]]:
        """(outputs of the requests that got a token or finished — final_only ones only when finished, the
        sequences that finished this step with their reasons)."""
        owner = self.owner
        touched: dict[str, Request] = {}
        finished: list[tuple[Sequence, str]] = []
        now = time.monotonic()
        appended = 0
        failed: list[tuple[Request, Exception]] = []
        if step.prompt:
            self._add_prompt_logprobs(step.prompt)
        for seq in step.seqs:
            own = owner.get(seq.seq_id)
            if own is None:  # aborted (or failed) while its step ran
                continue
            req, state = own
            appended += 1
            try:  # one request's bad value (detokenizer, logprobs) fails that request alone
                if state.logprobs is not None:
                    r = step.rows[seq.seq_id]
                    self._append(req, state, seq.token_ids[-1], step.chosen_logprobs[r], step.top[r], step.ranks[r])
                else:
                    self._append(req, state, seq.token_ids[-1], 0.0, None, None)
            except Exception as e:
                state.finish_reason = None  # fail() ends it, and hands it to the scheduler
                failed.append((req, e))
                continue
            if state.finish_reason is not None:
                finished.append((seq, state.finish_reason))
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            if not req.final_only or (state.finish_reason is not None and req.finished):
                touched[req.request_id] = req
        self.stats["generation_tokens_total"] += appended
        for req, _ in failed:
            touched.pop(req.request_id, None)
        outputs = []
        for req in touched.values():
            if req.finished:
                req.metrics.finished_time = now
                self.requests.pop(req.request_id, None)
                for s in req.states:
                    owner.pop(s.seq.seq_id, None)
                self.stats["num_requests_finished"] += 1
            outputs.append(self.output(req))
        for req, e in failed:
            got = self.fail(req.request_id, f"{type(e).__name__}: {e}")
            if got is not None:
                outputs.append(got[0])
                finished.extend((s, "abort") for s in got[1])  # the scheduler frees them
        return outputs, finished

    def output(self, req: Request) -> RequestOutput:
        for st in req.states:
            if st.detok is None and st.num_detok >= 0:
                st.text = detokenize_output(self.tokenizer, req.prompt_token_ids,
                                            st.seq.output_token_ids[: st.num_detok],
                                            req.params.skip_special_tokens)
                if st.finish_reason is not None:
                    st.num_detok = -1  # final: no need to decode again
        return req.output()

    def _text(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def _add_prompt_logprobs(self, rows: list[tuple[int, int, tuple]]) -> None:
        """Files a step's scored rows into their requests' arrays (Request.prompt_logprobs): position p's row scores
        prompt token p + 1. No per-token Python work: vLLM's per-token dicts are built only when a caller reads
        RequestOutput.prompt_logprobs (PromptLogprobList)."""
        owner = self.owner
        for seq_id, first, arrays in rows:
            own = owner.get(seq_id)
            if own is not None:  # None: aborted while its step ran
                own[0].prompt_logprobs.add(first, *arrays)

    # ------------------------------------------------------------------ one token
    def _append(self, req: Request, st: SeqState, token: int, logprob: float, top, rank: int | None) -> None:
        p = req.params
        if st.logprobs is not None:
            text = self._text
            entry = {t: Logprob(lp, r + 1, text(t)) for r, (t, lp) in enumerate(top or [])}
            if token not in entry:
                entry[token] = Logprob(logprob, rank, text(token))
            st.logprobs.append(entry)
            st.cumulative_logprob += logprob
        seq = st.seq
        n_tokens = len(seq.token_ids)
        n_out = n_tokens - seq.num_prompt_tokens
        can_stop = n_out >= p.min_tokens
        if st.grammar is not None:
            st.grammar.accept(token)  # raises (this request fails alone) for a token its grammar forbids
        if st.grammar is not None and st.grammar.terminated:
            # The grammar is complete and took a stop token (its mask allowed only those): the output is whole,
            # whatever ignore_eos or min_tokens say. The stop token's text is not part of the output.
            st.finish_reason = "stop"
            st.stop_reason = token if token in (p.stop_token_ids or []) else None
        elif can_stop and token in req.stop_ids:
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
