"""Two tensor-parallel engines, one after the other, in one process (tests and benchmarks do this): the second
must start, run and shut down like the first. Prints each run's greedy tokens.

    python bench/tp_twice.py [--disable-custom-all-reduce]
"""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minke import LLM, SamplingParams  # noqa: E402
from tiny_models import make_checkpoint  # noqa: E402


def main() -> int:
    faulthandler.dump_traceback_later(90, exit=True)  # a hang prints where it is
    nccl_only = "--disable-custom-all-reduce" in sys.argv
    path = tempfile.mkdtemp()
    make_checkpoint("deepseek_v2_lite", path, tokenizer=True, vocab_size=102400)
    for i in range(2):
        llm = LLM(path, device="cuda", dtype="float32", kv_cache_tokens=4096, max_model_len=256,
                  tensor_parallel_size=2, disable_custom_all_reduce=nccl_only)
        out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        print(i, out[0].outputs[0].token_ids, flush=True)
        llm.llm_engine.runner.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
