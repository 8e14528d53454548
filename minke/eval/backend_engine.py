"""The in-process backend: minke's LLM, every request of a task submitted in one batch so the engine schedules them
together; requests that share a few-shot prefix share its KV blocks through the prefix cache
(enable_prefix_caching, on by default), so the prefix is computed once per step-batch rather than once per question.

Loglikelihoods come from the engine's prompt logprobs (`SamplingParams(prompt_logprobs=1)`, vLLM's field): each
continuation position's own token's logprob and its rank, computed per prefill chunk, and only for the continuation
(`prompt_logprobs_start`, minke's field), read from RequestOutput.prompt_logprobs' arrays."""

from __future__ import annotations

import itertools


from ..engine.llm import LLM
from ..sampling_params import SamplingParams
from .backend import fit_context


class EngineBackend:
    def __init__(self, llm: LLM, batch_size: int = 0):
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.max_model_len = llm.max_model_len
        self.batch_size = batch_size  # requests per engine call; 0 = all of a task's requests at once
        self._ids = itertools.count()
        # Prompt tokens of loglikelihood requests, and how many of them the prefix cache served.
        self.stats = {"prompt_tokens": 0, "cached_tokens": 0}

    def _chunks(self, items: list) -> list[list]:
        n = self.batch_size or len(items) or 1
        return [items[i:i + n] for i in range(0, len(items), n)]

    def loglikelihood(self, pairs, desc=""):
        # The prompt must leave room for the one generated token the engine always produces.
        fitted = [fit_context(c, x, self.max_model_len - 1) for c, x in pairs]
        results = []
        for chunk in self._chunks(fitted):
            outs = self._score(chunk, desc)
            for (ctx, cont), out in zip(chunk, outs):
                plp, a, b = out.prompt_logprobs, len(ctx), len(ctx) + len(cont)
                if not plp.scored[a:b].all():
                    raise RuntimeError(f"request {out.request_id}: continuation tokens {a}..{b - 1} were not scored")
                # summed in order as Python floats (the float32 values), as lm-eval's hf backend sums them
                results.append((sum(plp.logprobs[a:b].tolist()), bool((plp.ranks[a:b] == 1).all())))
        return results

    def _score(self, chunk: list[tuple[list[int], list[int]]], desc: str) -> list:
        """Runs (context, continuation) prompts with prompt logprobs wanted only for the continuation's tokens
        (prompt_logprobs_start = len(context)). The context's own logits are never needed, so the prefix cache may
        serve it: k-shot prompts sharing their header and shots compute them once, as vLLM's prompt_logprobs (every
        position, no cache hit) cannot."""
        engine = self.llm.llm_engine
        rids = []
        for ctx, cont in chunk:
            rid = f"eval-{next(self._ids)}"
            params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, prompt_logprobs_start=len(ctx),
                                    output_kind="final_only")
            engine.add_request(rid, {"prompt_token_ids": ctx + cont}, params)
            rids.append(rid)
        outs = self.llm._run(rids, use_tqdm=True, desc=desc or "loglikelihood")
        self.stats["prompt_tokens"] += sum(len(o.prompt_token_ids) for o in outs)
        self.stats["cached_tokens"] += sum(o.num_cached_tokens for o in outs)
        return outs

    def generate(self, requests, desc=""):
        texts = []
        for chunk in self._chunks(requests):
            prompts, params = [], []
            for r in chunk:
                if r.messages is not None:
                    prompts.append({"prompt_token_ids": self.tokenizer.apply_chat_template(r.messages)})
                else:
                    prompts.append(r.prompt)
                params.append(SamplingParams(temperature=0.0, max_tokens=r.max_tokens, stop=list(r.stop) or None))
            texts += [out.outputs[0].text for out in self.llm.generate(prompts, params)]
        return texts


def engine_backend(model: str | None, batch_size: int = 0, **engine_kwargs) -> EngineBackend:
    engine_kwargs.setdefault("enable_prefix_caching", True)
    return EngineBackend(LLM(model, **engine_kwargs), batch_size)
