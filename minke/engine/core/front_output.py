"""The API process's output side: a step message of the core (the new token of every sequence that got one) becomes
RequestOutputs, for all of this front's requests at once: the tokens are appended to the front's own copies of
the sequences, then the ordinary OutputProcessor runs once over the whole step (incremental detokenization, stop
strings, logprob token strings, token-level stops, RequestOutputs). What it ends that the core did not (a stop
string) goes back to the core as an abort / stop; what the core ended (its token-level stops, which the front
decides the same way, or a failure) the front honours."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ...tokenizer import Tokenizer
from ..output_processor import OutputProcessor, StepSamples
from ..outputs import RequestOutput
from ..request import Request
from .messages import decode_plp


@dataclass
class FrontStep:
    """What one core step means for this front."""

    outputs: list[RequestOutput] = field(default_factory=list)  # one per request that changed, errors included
    abort: list[int] = field(default_factory=list)  # handles the core must end (a stop string ended them here)
    stop: list[list[int]] = field(default_factory=list)  # [handle, index]: sequences of n > 1 requests to end


class FrontOutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int):
        self.op = OutputProcessor(tokenizer, max_model_len)
        self.by_handle: dict[int, Request] = {}
        self.handle_of: dict[str, int] = {}

    @property
    def requests(self) -> dict[str, Request]:
        return self.op.requests

    def add(self, req: Request, handle: int) -> None:
        self.op.add(req)
        self.by_handle[handle] = req
        self.handle_of[req.request_id] = handle

    def _forget(self, request_id: str) -> None:
        h = self.handle_of.pop(request_id, None)
        if h is not None:
            self.by_handle.pop(h, None)

    def abort(self, request_id: str) -> tuple[RequestOutput, int] | None:
        """Ends a request here: (its last output, its handle, for the core's abort), or None if not in flight."""
        h = self.handle_of.get(request_id)
        ended = self.op.abort(request_id)
        self._forget(request_id)
        if ended is None or h is None:
            return None
        return ended[0], h

    def fail_all(self, error: str) -> list[RequestOutput]:
        outs = []
        for rid in list(self.op.requests):
            got = self.op.fail(rid, error)
            self._forget(rid)
            if got is not None:
                outs.append(got[0])
        return outs

    def apply(self, header: dict, handles: np.ndarray, indices: np.ndarray, tokens: np.ndarray) -> FrontStep:
        res = FrontStep()
        by_handle = self.by_handle
        now = time.monotonic()
        for h, n in header.get("cached", ()):
            req = by_handle.get(h)
            if req is not None:
                req.metrics.num_cached_tokens = n
                if req.metrics.first_scheduled_time is None:
                    req.metrics.first_scheduled_time = now
        lp = header.get("lp")
        seqs = []
        rows: dict[int, int] | None = {} if lp else None
        chosen, ranks, top = [], [], []
        row_of: dict[int, int] = {}  # core row -> index in seqs
        for r, (h, i, t) in enumerate(zip(handles.tolist(), indices.tolist(), tokens.tolist())):
            req = by_handle.get(h)
            if req is None:  # ended here while the core ran its step
                continue
            st = req.states[i]
            if st.finish_reason is not None:
                continue
            st.seq.token_ids.append(t)
            row_of[r] = len(seqs)
            seqs.append(st.seq)
            if lp is not None and r in lp:
                c, rank, tp = lp[r]
                rows[st.seq.seq_id] = len(chosen)
                chosen.append(c)
                ranks.append(rank)
                top.append(tp)
        core_fin = {}
        for r, reason, stop_reason in header.get("fin", ()):
            if r in row_of:
                core_fin[seqs[row_of[r]].seq_id] = (reason, stop_reason)
        owner = self.op.owner
        before = {s.seq_id: owner[s.seq_id] for s in seqs if s.seq_id in owner}
        prompt = None
        if "plp" in header:  # prompt-logprob rows: filed into the front's request arrays, as in-process
            prompt = []
            for h, first, k, *arrays in header["plp"]:
                req = by_handle.get(h)
                if req is not None:
                    prompt.append((req.states[0].seq.seq_id, first, decode_plp(k, *arrays)))
        outs, finished = self.op.process(StepSamples(seqs, rows, chosen or None, top or None, ranks or None,
                                                     prompt or None))
        res.outputs.extend(outs)
        # What the front ended on its own (a stop string; a detokenizer failure): the core must end it too.
        for seq, _ in finished:
            if seq.seq_id in core_fin:
                continue
            req, st = before[seq.seq_id]
            h = self.handle_of[req.request_id]  # forgotten only below
            if req.request_id not in self.op.requests:  # it ended whole here: the core ends all of it
                if h not in res.abort:
                    res.abort.append(h)
            else:
                res.stop.append([h, st.index])
        # What the core ended that the front did not (a token-level rule only the core knows): honour it.
        for seq_id, (reason, stop_reason) in core_fin.items():
            own = before.get(seq_id)
            if own is None:
                continue
            req, st = own
            if st.finish_reason is None and req.request_id in self.op.requests:
                st.finish_reason, st.stop_reason = reason, stop_reason
                if req.finished:
                    res.outputs.append(self._finish(req, now))
        for out in res.outputs:
            if out.finished:
                self._forget(out.request_id)
        for h, msg in header.get("err", ()):
            req = by_handle.get(h)
            if req is not None:
                got = self.op.fail(req.request_id, msg)
                self._forget(req.request_id)
                if got is not None:
                    res.outputs.append(got[0])
        return res

    def _finish(self, req: Request, now: float) -> RequestOutput:
        op = self.op
        req.metrics.finished_time = now
        op.requests.pop(req.request_id, None)
        for s in req.states:
            op.owner.pop(s.seq.seq_id, None)
        op.stats["num_requests_finished"] += 1
        return op.output(req)
