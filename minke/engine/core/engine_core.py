"""EngineCore: the scheduler and the model, nothing of text (vLLM v1's EngineCore). An LLMEngine whose output side
is the CoreOutputProcessor: each step yields, per front, the new token ids of every request that got one.

It runs inside the core process (core_proc.py) but is a plain object: the tests drive it directly too."""

from __future__ import annotations

import dataclasses
import logging

from ..config import EngineConfig
from ..llm_engine import LLMEngine
from ..request import Request
from .core_output import CoreOutputProcessor
from .messages import StepBatch

logger = logging.getLogger("minke")


class EngineCore:
    def __init__(self, cfg: EngineConfig):
        engine = LLMEngine(cfg)
        # The engine's text-side OutputProcessor is replaced by the token-only one; the step pipeline reads the
        # requests in flight through `owner`, so it gets the new map.
        out = CoreOutputProcessor(engine.max_model_len)
        engine.output_processor = out
        engine.pipeline.owner = out.owner
        self.engine, self.out = engine, out
        self.max_model_len = engine.max_model_len

    @staticmethod
    def request_id(front: int, handle: int) -> str:
        return f"{front}:{handle}"

    # ------------------------------------------------------------------ requests
    def add(self, front: int, handle: int, data: dict) -> None:
        """data: messages.encode_request of the front's Request. The core checks it again (cheap) and builds its
        own sequences; stop strings stay with the front (they need the text), and nothing here needs text."""
        fields = dict(data["fields"])
        params = dataclasses.replace(fields.pop("params"), stop=[], output_kind="final_only")
        ids = fields.pop("prompt_token_ids")
        lora = fields.pop("lora_request", None)
        rid = self.request_id(front, handle)
        # The core's InputProcessor builds the sequences (their adapter id) and, from params.structured_outputs,
        # the core's own grammar states (its compiled-grammar cache): the front's matchers do not travel.
        req = self.engine.input_processor.process(rid, ids, params, data.get("arrival_time"), lora_request=lora)
        for name, value in fields.items():  # fields added to Request since, that the core does not derive
            setattr(req, name, value)
        if lora is not None:
            self.engine.add_lora(lora)  # registered on first use, as LLMEngine.add_request does
        self.out.add(req, front, handle)
        for s in req.states:
            self.engine.scheduler.add(s.seq)

    def add_or_fail(self, front: int, handle: int, data: dict) -> None:
        try:
            self.add(front, handle, data)
        except Exception as e:  # a request the core refuses fails alone
            logger.warning("request %s refused by the engine core: %s", self.request_id(front, handle), e)
            self.out.batch(front).err.append([handle, f"{type(e).__name__}: {e}"])

    def abort(self, front: int, handles) -> None:
        for h in handles:
            self.engine.abort_request(self.request_id(front, h))

    def stop(self, front: int, seqs) -> None:
        for h, index in seqs:
            seq = self.out.stop_seq(self.request_id(front, h), index)
            if seq is not None:
                self.engine.scheduler.abort(seq.seq_id)

    def drop_front(self, front: int) -> None:
        """A front left: its requests end."""
        for rid, (f, _) in list(self.out.route.items()):
            if f == front:
                self.engine.abort_request(rid)

    # ------------------------------------------------------------------ control calls (between steps)
    CALLS = frozenset({"add_lora", "remove_lora", "list_loras"})

    def call(self, method: str, args: list):
        """A front's control call (messages.CALL); the result must be plain data (serial.py)."""
        if method not in self.CALLS:
            raise ValueError(f"unknown engine-core call {method!r}")
        return getattr(self.engine, method)(*args)

    # ------------------------------------------------------------------ steps
    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> dict[int, StepBatch]:
        """One engine step; the per-front batches of what it produced (empty when it sampled nothing). Should the
        engine's own recovery fail, every request in flight fails (its front is told) and the core goes on."""
        try:
            self.engine.step()
        except Exception as e:
            logger.exception("engine step failed and could not recover; failing the requests in flight")
            for rid in list(self.out.requests):
                self.engine._release(self.out.fail(rid, f"engine step failed: {type(e).__name__}: {e}"))
        return self.out.take()

    def take(self) -> dict[int, StepBatch]:
        return self.out.take()

    def get_stats(self) -> dict:
        return self.engine.get_stats()

    def shutdown(self) -> None:
        self.engine.runner.shutdown()
