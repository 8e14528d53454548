"""The `--base-url` backend: any OpenAI-compatible server (`minke serve`, vLLM, SGLang, ...).

Loglikelihoods use the legacy completions API as lm-eval's `local-completions` does: the prompt sent as token ids
(so the server scores exactly the tokens the engine backend scores), `echo: true, logprobs: 1, max_tokens: 1`, and
the prompt's token_logprobs read back. Generations are greedy completions (or chat completions for chat
messages). Requests go in batches of prompts, several in flight at once."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import httpx
from tqdm.auto import tqdm

from .backend import GenerationRequest, fit_context

# Plain greedy decoding, whatever defaults the server takes from the model's generation_config.json (vLLM and minke
# apply its repetition_penalty to requests that do not set one; the engine backend decodes without it).
GREEDY = {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0}


class OpenAIBackend:
    def __init__(self, base_url: str, tokenizer, max_model_len: int, model: str | None = None,
                 api_key: str | None = None, batch_size: int = 16, num_concurrent: int = 4, timeout: float = 600):
        base = base_url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        key = api_key or os.environ.get("OPENAI_API_KEY")
        self.client = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {key}"} if key else {})
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.batch_size = max(1, batch_size)
        self.num_concurrent = max(1, num_concurrent)
        self.model = model or self._first_model()

    def _post(self, path: str, body: dict) -> dict:
        try:
            r = self.client.post(f"{self.base}{path}", json=body)
        except httpx.HTTPError as e:
            raise ConnectionError(f"{self.base}{path}: {e}") from None
        if r.status_code != 200:
            try:
                msg = r.json()["error"]["message"]
            except Exception:
                msg = r.text[:300]
            raise ValueError(f"{self.base}{path} answered {r.status_code}: {msg}")
        return r.json()

    def _first_model(self) -> str:
        try:
            r = self.client.get(f"{self.base}/models")
            r.raise_for_status()
            return r.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise ConnectionError(f"{self.base}/models: cannot list the served models ({e}); pass --model-name")

    def _map(self, fn, batches: list, desc: str, total: int) -> list:
        bar = tqdm(total=total, desc=desc or "requests", unit="req", disable=total < 2)
        out = []
        with ThreadPoolExecutor(self.num_concurrent) as pool:
            for res in pool.map(fn, batches):  # in order
                out += res
                bar.update(len(res))
        bar.close()
        return out

    def _batches(self, items: list) -> list[list]:
        return [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]

    def loglikelihood(self, pairs, desc=""):
        # The server generates one token after the prompt: the prompt leaves room for it.
        fitted = [fit_context(c, x, self.max_model_len - 1) for c, x in pairs]

        def score(batch):
            body = {"model": self.model, "prompt": [c + x for c, x in batch], "echo": True, "logprobs": 1,
                    "max_tokens": 1, "temperature": 0.0}
            choices = sorted(self._post("/completions", body)["choices"], key=lambda ch: ch["index"])
            res = []
            for (ctx, cont), ch in zip(batch, choices):
                lp = ch["logprobs"]
                total, greedy = 0.0, True
                for pos in range(len(ctx), len(ctx) + len(cont)):
                    total += lp["token_logprobs"][pos]
                    top = lp["top_logprobs"][pos]
                    greedy = greedy and lp["token_logprobs"][pos] >= max(top.values())
                res.append((total, greedy))
            return res

        return self._map(score, self._batches(fitted), desc, len(fitted))

    def generate(self, requests, desc=""):
        def complete(batch: list[GenerationRequest]):
            if batch[0].messages is not None:
                r = batch[0]
                body = {"model": self.model, "messages": r.messages, "max_tokens": r.max_tokens,
                        **GREEDY, **({"stop": list(r.stop)} if r.stop else {})}
                return [self._post("/chat/completions", body)["choices"][0]["message"]["content"] or ""]
            r = batch[0]  # one batch shares max_tokens and stop (see the grouping below)
            body = {"model": self.model, "prompt": [b.prompt for b in batch], "max_tokens": r.max_tokens,
                    **GREEDY, **({"stop": list(r.stop)} if r.stop else {})}
            choices = sorted(self._post("/completions", body)["choices"], key=lambda ch: ch["index"])
            return [ch["text"] for ch in choices]

        # Batches of text prompts with the same max_tokens and stop; chat requests one per call.
        batches, current = [], []
        for r in requests:
            key = (r.messages is None, r.max_tokens, tuple(r.stop))
            if current and (r.messages is not None or len(current) == self.batch_size
                            or key != (current[0].messages is None, current[0].max_tokens, tuple(current[0].stop))):
                batches.append(current)
                current = []
            current.append(r)
            if r.messages is not None:
                batches.append(current)
                current = []
        if current:
            batches.append(current)
        return self._map(complete, batches, desc, len(requests))
