"""`minke eval` against lm-eval on the same multiple-choice set, same GPU: 1,000 MMLU-style 5-shot questions
(4 options, letter scoring, ~700-token prompts sharing their 5-shot prefix), random weights of a named shape:

  1. lm-eval + `minke serve`   (lm-eval's local-completions: echo + logprobs over HTTP, token-id prompts)
  2. `minke eval`, engine       (in-process; the 5-shot prefix from the prefix cache)
  3. lm-eval + transformers     (lm-eval's hf backend, HFLM on transformers' model holding the same weights)

Each run's wall time (model load excluded: the serve process is up before the clock starts) and accuracy are
printed and written as JSON. The runs score the same prompts and tokens, so with the same weights the accuracies
agree up to bf16 ties.

    # H200, V2-Lite shape (random bf16 weights)
    python bench/bench_eval.py --shape v2-lite --questions 1000 --output bench_eval.json
    # CPU smoke test (tiny random deepseek_v2 model, 16 questions, all three runs)
    python bench/bench_eval.py --tiny --questions 16 --device cpu
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue side "
         "kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force "
         "education").split()
SUBJECT = "miscellaneous"
HEADER = f"The following are multiple choice questions (with answers) about {SUBJECT}."

TINY = dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=64, intermediate_size=128,
            moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, moe_layer_freq=1,
            kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
            max_position_embeddings=4096, rope_theta=10000, rms_norm_eps=1e-6, bos_token_id=100000,
            eos_token_id=100001, torch_dtype="float32")


def make_dataset(root: str, n: int, seed: int = 0) -> str:
    """MMLU's csv layout (dev/ 5 shots, test/ n questions) plus the same rows as JSON lines for lm-eval."""
    rng = random.Random(seed)

    def row():
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 60))).capitalize() + "?"
        opts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(4)]
        return [q, *opts, "ABCD"[rng.randrange(4)]]

    for split, count in (("dev", 5), ("test", n)):
        rows = [row() for _ in range(count)]
        os.makedirs(os.path.join(root, "mmlu", split), exist_ok=True)
        with open(os.path.join(root, "mmlu", split, f"{SUBJECT}_{split}.csv"), "w", newline="") as f:
            csv.writer(f).writerows(rows)
        with open(os.path.join(root, f"{split}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps({"question": r[0], "choices": r[1:5], "answer": "ABCD".index(r[5])}) + "\n")
    # lm-eval task: the same prompt as minke's mmlu (MMLU's original format, first 5 dev rows as shots).
    task_dir = os.path.join(root, "lm_eval_tasks")
    os.makedirs(task_dir, exist_ok=True)
    with open(os.path.join(task_dir, "bench_mc.yaml"), "w") as f:
        f.write(f"""task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {os.path.join(root, "test.jsonl")}
    dev: {os.path.join(root, "dev.jsonl")}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
num_fewshot: 5
output_type: multiple_choice
description: "{HEADER}\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
""")
    return task_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_lm_eval_serve(model_dir: str, task_dir: str, device: str, dtype: str, args) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    port = _free_port()
    cmd = [sys.executable, "-m", "minke.cli", "serve", model_dir, "--port", str(port), "--load-format", "dummy",
           "--device", device, "--dtype", dtype, "--served-model-name", "bench", "--disable-log-stats",
           *args.serve_args.split()]
    log = open(os.path.join(os.path.dirname(task_dir), "serve.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"minke serve exited {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("minke serve did not come up")
            time.sleep(1)
        t = time.perf_counter()
        res = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=(f"model=bench,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=huggingface,"
                        f"tokenizer={model_dir},num_concurrent={args.num_concurrent},max_retries=1,"
                        f"batch_size={args.http_batch}"),
            tasks=["bench_mc"], task_manager=TaskManager(include_path=task_dir), limit=args.questions)
        wall = time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    return {"wall_s": wall, "acc": res["results"]["bench_mc"]["acc,none"]}


def run_minke_eval(llm, data_root: str, args) -> dict:
    from minke.eval import EngineBackend, EvalOptions, evaluate

    # Warm-up on other questions with another 5-shot prefix: nothing of the timed run is in the prefix cache.
    warm = os.path.join(data_root, "warmup")
    make_dataset(warm, 8, seed=1)
    evaluate(EngineBackend(llm), [("mmlu", os.path.join(warm, "mmlu"))], EvalOptions())
    backend = EngineBackend(llm)
    t = time.perf_counter()
    rep = evaluate(backend, [("mmlu", os.path.join(data_root, "mmlu"))], EvalOptions(limit=args.questions))
    wall = time.perf_counter() - t
    return {"wall_s": wall, "acc": rep["results"]["mmlu"]["acc"], "prompt_tokens": backend.stats["prompt_tokens"],
            "cached_tokens": backend.stats["cached_tokens"]}


def run_lm_eval_hf(llm, cfg: dict, model_dir: str, task_dir: str, args) -> dict:
    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from minke.benchmark import transformers_model

    hf = transformers_model(llm, cfg)  # the very same weight tensors
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    lm = HFLM(pretrained=hf, tokenizer=tok, batch_size=args.hf_batch, max_length=4096)
    t = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=["bench_mc"], task_manager=TaskManager(include_path=task_dir),
                                  limit=args.questions)
    wall = time.perf_counter() - t
    return {"wall_s": wall, "acc": res["results"]["bench_mc"]["acc,none"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="v2-lite", help="a minke bench shape (random weights)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random deepseek_v2 model (CPU smoke test)")
    ap.add_argument("--questions", type=int, default=1000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 (cuda), float32 (cpu)")
    ap.add_argument("--runs", default="serve,minke,hf", help="which of serve,minke,hf to run")
    ap.add_argument("--num-concurrent", type=int, default=8, help="lm-eval local-completions: requests in flight")
    ap.add_argument("--http-batch", type=int, default=16, help="lm-eval local-completions: prompts per request")
    ap.add_argument("--hf-batch", type=int, default=32, help="lm-eval hf: batch size")
    ap.add_argument("--serve-args", default="--gpu-memory-utilization 0.5",
                    help="extra `minke serve` flags (default: %(default)s)")
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    from minke.benchmark import SHAPES, shape_dir

    if args.tiny:
        SHAPES["tiny"] = TINY
        args.shape = "tiny"
    model_dir = shape_dir(args.shape, None)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    root = tempfile.mkdtemp(prefix="minke-bench-eval-")
    task_dir = make_dataset(root, args.questions)
    runs = args.runs.split(",")
    out = {"shape": args.shape, "questions": args.questions, "device": args.device, "dtype": dtype}
    if "serve" in runs:
        out["lm_eval_minke_serve"] = run_lm_eval_serve(model_dir, task_dir, args.device, dtype, args)
        print(f"lm-eval + minke serve: {out['lm_eval_minke_serve']}", flush=True)
    if "minke" in runs or "hf" in runs:
        from minke import LLM

        kw = {"gpu_memory_utilization": 0.5} if args.device.startswith("cuda") else {}
        llm = LLM(model_dir, load_format="dummy", dtype=dtype, device=args.device, max_model_len=4096, **kw)
        if "minke" in runs:
            out["minke_eval"] = run_minke_eval(llm, root, args)
            print(f"minke eval (engine): {out['minke_eval']}", flush=True)
        if "hf" in runs:
            out["lm_eval_transformers"] = run_lm_eval_hf(llm, cfg, model_dir, task_dir, args)
            print(f"lm-eval + transformers: {out['lm_eval_transformers']}", flush=True)
    base = out.get("minke_eval", {}).get("wall_s")
    for k in ("lm_eval_minke_serve", "lm_eval_transformers"):
        if base and k in out:
            out[k]["x_minke_eval"] = out[k]["wall_s"] / base
    print(json.dumps(out, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
