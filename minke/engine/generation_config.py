"""The model's recommended sampling defaults, from its `generation_config.json`, as vLLM takes them
(`ModelConfig.get_diff_sampling_param`): temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens
(as max_tokens). They apply where a call or request leaves a value unset: `LLM.generate(prompts)` without
SamplingParams (`LLM.get_default_sampling_params()`), a server request without `temperature`, a `minke generate`
without `--temperature`. `EngineConfig.generation_config`: "auto" (the model directory's file), "vllm" (ignore it:
SamplingParams' own defaults), or a directory holding a generation_config.json.
"""

from __future__ import annotations

import json
import logging
import os

from ..sampling_params import SamplingParams

logger = logging.getLogger("minke")

FILENAME = "generation_config.json"
GENERATION_CONFIG_MODES = ("auto", "vllm")
# generation_config.json key -> SamplingParams field (vLLM's list).
FIELDS = {"repetition_penalty": "repetition_penalty", "temperature": "temperature", "top_k": "top_k",
          "top_p": "top_p", "min_p": "min_p", "max_new_tokens": "max_tokens"}
# vLLM reads the file through transformers' GenerationConfig.to_diff_dict(), which drops a value equal to
# transformers' own default; for these fields SamplingParams' default is the same setting (off), except top_k: HF's
# default 50 is dropped, so top_k stays off, as in vLLM.
_HF_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


def check_generation_config(value: str) -> None:
    if value in GENERATION_CONFIG_MODES:
        return
    if not isinstance(value, str) or not os.path.isdir(value):
        raise ValueError(f"generation_config must be 'auto', 'vllm' or a directory holding {FILENAME}, "
                         f"got {value!r}")


def load_generation_defaults(model_dir: str, mode: str = "auto", log: bool = True) -> dict:
    """{SamplingParams field: value} the model recommends ({} without a file, or with mode "vllm"). A bad value
    is a ValueError naming the file and the field. log: say once which defaults were taken (vLLM warns too)."""
    check_generation_config(mode)
    if mode == "vllm":
        return {}
    path = os.path.join(model_dir if mode == "auto" else mode, FILENAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the generation config: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    out = {}
    for key, name in FIELDS.items():
        v = raw.get(key)
        if v is None or (key in _HF_DEFAULTS and v == _HF_DEFAULTS[key]):
            continue
        out[name] = v
    try:  # every value checked as SamplingParams checks a caller's
        SamplingParams(**out)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if out and log:
        logger.warning("Default sampling parameters taken from the model's %s: %s. A call or request that sets a "
                       "value overrides it; --generation-config vllm (generation_config=\"vllm\") ignores the file.",
                       path, ", ".join(f"{k}={v}" for k, v in out.items()))
    return out
