"""`LLM`: the offline entry point, shaped like vLLM's (`LLM(model).generate(prompts, SamplingParams)`)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Sequence

from tqdm.auto import tqdm

from ..default_model import resolve_model
from ..lora.request import LoRARequest
from ..sampling_params import SamplingParams
from .config import EngineConfig, offline_max_num_batched_tokens
from .generation_config import load_generation_defaults
from .input_processor import Prompt
from .llm_engine import LLMEngine
from .outputs import RequestOutput


def _is_token_ids(x) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _as_prompt_list(prompts) -> list:
    """One prompt (text, token ids, a vLLM prompt dict) or a sequence of them -> a list of prompts."""
    if isinstance(prompts, (str, Mapping)) or _is_token_ids(prompts):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string, a list of token ids, a prompt dict or a list of those, got "
                        f"{type(prompts).__name__}")
    return list(prompts)


def _token_id_prompts(prompt_token_ids) -> list[dict]:
    """vLLM's legacy `prompt_token_ids=` (one list of ids, or a list of them) as {"prompt_token_ids": ...} prompts.
    An item may also be a mapping with "input_ids": transformers >= 5's apply_chat_template returns a BatchEncoding
    by default, so the DeepSeek-V2 README's vLLM snippet hands those over unchanged."""
    items = [prompt_token_ids] if _is_token_ids(prompt_token_ids) or isinstance(prompt_token_ids, Mapping) \
        else prompt_token_ids
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"prompt_token_ids must be a list of token ids or a list of such lists, got "
                        f"{type(prompt_token_ids).__name__}")
    out = []
    for i, ids in enumerate(items):
        if isinstance(ids, Mapping) and "input_ids" in ids:
            ids = ids["input_ids"]
        if hasattr(ids, "tolist"):  # a tensor / array row
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"prompt_token_ids[{i}] must be a list of token ids, got {type(ids).__name__}")
        out.append({"prompt_token_ids": list(ids)})
    return out


class LLM:
    """model: a checkpoint directory (None = the embedded default model). Options: see EngineConfig (vLLM's
    names: tensor_parallel_size, max_model_len, enforce_eager, trust_remote_code, generation_config, ...).
    On a GPU of >= 70 GiB max_num_batched_tokens defaults to 16384 here (vLLM's LLM-class rule; the server's
    default stays 8192)."""

    def __init__(self, model: str | None = None, **kwargs):
        if kwargs.get("max_num_batched_tokens") is None and kwargs.get("enable_chunked_prefill", True) is not False:
            # offline: vLLM's LLM-class default on large GPUs (larger prefill steps; the server keeps 8192)
            offline = offline_max_num_batched_tokens(kwargs.get("device"))
            if offline is not None:
                kwargs["max_num_batched_tokens"] = offline
        cfg = EngineConfig.from_kwargs(resolve_model(model), **kwargs)
        # Read (and checked) before the weights load: a bad generation_config.json fails at once.
        self._default_sampling = load_generation_defaults(cfg.model, cfg.generation_config)
        self.llm_engine = LLMEngine(cfg)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.llm_engine.max_model_len

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` / `chat` use without SamplingParams: the model's generation_config.json defaults
        (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens as max_tokens) over SamplingParams'
        own; just SamplingParams() with generation_config="vllm" or without the file. vLLM's method."""
        return SamplingParams(**self._default_sampling)

    def generate(self, prompts: Prompt | Sequence[Prompt] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 prompt_token_ids: list[int] | list[list[int]] | None = None, use_tqdm: bool = True,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Generates for every prompt, all batched together; outputs come back in order. prompts: text, token ids,
        vLLM's {"prompt": ...} / {"prompt_token_ids": ...} dicts, or a list of those; or vLLM's older
        `prompt_token_ids=[[...], ...]` instead. sampling_params: one for all, or one per prompt; None = the
        model's defaults (`get_default_sampling_params`). lora_request: one adapter for all, or one per prompt
        (None = the base model), as vLLM's; needs enable_lora=True."""
        if prompt_token_ids is not None:
            if prompts is not None:
                raise ValueError("give prompts or prompt_token_ids, not both")
            prompts = _token_id_prompts(prompt_token_ids)
        elif prompts is None:
            raise ValueError("generate needs prompts (or prompt_token_ids)")
        else:
            prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params[{i}] must be a SamplingParams, got {type(p).__name__}")
        loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(loras)} lora_requests")
        for lr in dict.fromkeys(x for x in loras if x is not None):  # each adapter read and checked once, first
            if not isinstance(lr, LoRARequest):
                raise TypeError(f"lora_request must be a LoRARequest (or a list of them), got {type(lr).__name__}")
            self.llm_engine.add_lora(lr)
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
        for i, (prompt, p, lr) in enumerate(zip(prompts, params, loras)):
            try:
                requests.append(engine.input_processor.process(str(next(self._ids)), prompt, p, lora_request=lr))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        for req in requests:
            engine.add_request(req.request_id, req)
        return self._run([req.request_id for req in requests], use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             tools: list[dict] | None = None, lora_request: LoRARequest | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or several; renders the chat template and generates.
        tools: OpenAI function tools shown to the model (vLLM's argument; see minke/tokenizer/tool_prompt.py)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        render = self.llm_engine.input_processor.render_chat
        prompts = [render(c, chat_template, add_generation_prompt, tools) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    # vLLM's adapter methods
    def add_lora(self, lora_request: LoRARequest) -> bool:
        return self.llm_engine.add_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self.llm_engine.remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        return {r.lora_int_id for r in self.llm_engine.list_loras()}

    def _run(self, order: list[str], use_tqdm: bool, desc: str = "Processed prompts") -> list[RequestOutput]:
        """Steps the engine until the added requests `order` finish; their final outputs in that order. On any
        exception (Ctrl-C included) the unfinished ones are aborted first. Also minke eval's loop (eval/backend_engine)."""
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(order), desc=desc, unit="req", disable=not use_tqdm or len(order) < 2)
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
