"""`LLM`: the offline entry point, shaped like vLLM's (`LLM(model).generate(prompts, SamplingParams)`)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

from tqdm.auto import tqdm

from ..default_model import resolve_model
from ..sampling_params import SamplingParams
from .config import EngineConfig
from .llm_engine import LLMEngine
from .outputs import RequestOutput

Prompt = str | list[int]


class LLM:
    """model: a checkpoint directory (None = the embedded default model). Options: see EngineConfig."""

    def __init__(self, model: str | None = None, **kwargs):
        self.llm_engine = LLMEngine(EngineConfig.from_kwargs(resolve_model(model), **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.llm_engine.max_model_len

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams]
                 | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates for every prompt (text or token ids), all batched together; outputs come back in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
        # Only finished outputs are returned: the engine need not build an output (nor, without stop strings,
        # detokenize) every step. One copy per distinct params object; the caller's are left as they are.
        final: dict[int, SamplingParams] = {}
        for p in params:
            if id(p) not in final:
                final[id(p)] = p if p.output_kind == "final_only" else dataclasses.replace(p, output_kind="final_only")
        params = [final[id(p)] for p in params]
        engine = self.llm_engine
        # Every prompt is processed (tokenized, checked) once, before any is added: a bad one fails before any
        # work, naming its index.
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                requests.append(engine.input_processor.process(str(next(self._ids)), prompt, p))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        for req in requests:
            engine.add_request(req.request_id, req)
        return self._run([req.request_id for req in requests], use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True
             ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or several; renders the chat template and generates."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.llm_engine.tokenizer
        prompts = [tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt, chat_template=chat_template)
                   for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(order), desc="Processed prompts", unit="req", disable=not use_tqdm or len(order) < 2)
        try:
            while len(done) < len(order):
                if not engine.has_unfinished_requests():
                    raise RuntimeError("engine stopped with requests unfinished")
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in order:  # leave the engine clean for the next call (Ctrl-C included)
                if rid not in done:
                    engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [done[rid] for rid in order]
