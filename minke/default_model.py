"""The embedded default model: a small deepseek_v2-architecture chat model shipped inside the package, used when
no model directory is given (`minke chat`, `minke serve`, `minke generate`, `LLM()`). Rebuilt by the commands
in scripts/build_default_model.sh."""

from __future__ import annotations

import os

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "assets", "default_model")


def default_model_dir() -> str:
    if not os.path.exists(os.path.join(DEFAULT_MODEL_DIR, "config.json")):
        raise FileNotFoundError(
            f"the embedded default model is not in this installation ({DEFAULT_MODEL_DIR}); "
            "pass a checkpoint directory, or rebuild it with scripts/build_default_model.sh")
    return DEFAULT_MODEL_DIR


def resolve_model(model: str | os.PathLike | None) -> str:
    """A checkpoint directory to load: the given one (checked), or the embedded default model."""
    if model is None:
        return default_model_dir()
    path = os.fspath(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model directory does not exist: {path} (minke loads local checkpoint "
                                "directories; nothing is downloaded)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path is not a directory: {path}")
    adapter = os.path.join(path, "adapter_config.json")
    if not os.path.exists(os.path.join(path, "config.json")) and os.path.isfile(adapter):
        raise FileNotFoundError(_adapter_message(path, adapter))
    return path


def _adapter_message(path: str, adapter_config: str) -> str:
    import json

    try:
        with open(adapter_config, encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path") or "BASE_MODEL_DIR"
    except (OSError, ValueError):
        base = "BASE_MODEL_DIR"
    return (f"{path} is a LoRA adapter (adapter_config.json), not a model directory; its base model is {base}. "
            f"Fold it into the base and run the result: minke finetune --merge {path} --output_dir MERGED_DIR "
            f"[--model_name_or_path {base}], then minke generate MERGED_DIR (in Python: "
            "minke.train.lora.load_adapter(minke.load_model(BASE), ADAPTER_DIR))")
