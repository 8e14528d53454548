"""`minke eval`: benchmarks on the engine in-process or on any OpenAI-compatible server (see minke/eval/tasks.py).

    from minke.eval import evaluate, engine_backend, EvalOptions
    report = evaluate(engine_backend(None), "story_mc,perplexity", EvalOptions(limit=20))
"""

from .backend import GenerationRequest, encode_pair
from .backend_engine import EngineBackend, engine_backend
from .evaluator import evaluate, format_table, write_json
from .options import EvalOptions
from .tasks import TASKS

__all__ = ["EvalOptions", "EngineBackend", "GenerationRequest", "TASKS", "encode_pair", "engine_backend", "evaluate",
           "format_table", "write_json"]
