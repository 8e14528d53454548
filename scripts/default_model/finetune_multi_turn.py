"""The default model's multi-turn pass (issue 24, part 2 item 6): full fine-tuning of the shipped model with minke's
own trainer (`minke finetune`) on three-turn conversations (multi_turn.py) plus a replay of what it already does
(small-talk pairs of small_talk.py and story requests of simple_stories.py, so neither is forgotten), then the
evaluations the tests use, before and after:

  - three-turn conversations (multi_turn_eval.json, held out): how many third answers name the topic;
  - small talk (small_talk_eval.json, held out): the share of answers with an accepted keyword;
  - stories: of the grammar's 50 topics, how many "Tell me a story about the X." answers name X and end.

    # on one GPU (a few minutes); writes OUT/model (HF format: config, model.safetensors, tokenizer, ...) and
    # OUT/eval.json
    python scripts/default_model/finetune_multi_turn.py --out_dir build/default_model/multiturn --device cuda
    # CPU smoke (a few steps; the numbers are not meant to reach the targets)
    nice -n 19 python scripts/default_model/finetune_multi_turn.py --out_dir /tmp/mt --device cpu --max_steps 3 \
        --num_conversations 200 --skip_eval

Then copy OUT/model/model.safetensors over minke/assets/default_model/model.safetensors (config, tokenizer and
generation_config are unchanged) once OUT/eval.json meets the targets: --target_multi_turn of 24, the small-talk
score no lower than the shipped model's by more than 0.05, and at least 40 of 50 stories on topic (the bound of
tests/test_default_model.py). The script exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))  # this checkout's minke, for the evaluations (the fine-tuning gets PYTHONPATH)
import multi_turn  # noqa: E402  (beside this file)

SHIPPED = ROOT / "minke" / "assets" / "default_model"


def build_data(path: Path, n_conv: int, n_small_talk: int, n_stories: int, seed: int) -> dict:
    """Writes the mix as {"messages"} JSON lines (shuffled); returns the counts."""
    st, stories = multi_turn.st, multi_turn.stories
    rng = random.Random(seed)
    rows = [{"messages": r["messages"]} for r in multi_turn.generate(n_conv, seed)]
    for r in st.generate(n_small_talk, seed + 1):
        rows.append({"messages": [{"role": "user", "content": r["instruction"]},
                                  {"role": "assistant", "content": r["output"]}]})
    for _ in range(n_stories):
        t = rng.choice(stories.TOPICS)
        req = rng.choice(stories.REQUESTS).format(a=stories._a(t), t=t)
        rows.append({"messages": [{"role": "user", "content": req},
                                  {"role": "assistant", "content": stories.story(t, rng)}]})
    rng.shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"conversations": n_conv, "small_talk": n_small_talk, "story_requests": n_stories, "rows": len(rows)}


def evaluate(model_dir: str, device: str) -> dict:
    from minke import LLM

    llm = LLM(model_dir, device=device)
    hits, results = multi_turn.evaluate(llm)
    score, _ = _small_talk(llm)
    on_topic, _ = _stories(llm)
    return {"multi_turn": hits, "multi_turn_of": len(results), "small_talk": round(score, 3),
            "stories_on_topic": on_topic, "multi_turn_answers": [r["turns"] for r in results]}


def _small_talk(llm):
    """small_talk.evaluate on an LLM already built (on any device)."""
    from minke import SamplingParams

    st = multi_turn.st
    items = st.load_eval()
    outs = llm.chat([[{"role": "user", "content": e["prompt"]}] for e in items],
                    SamplingParams(temperature=0.0, max_tokens=80), use_tqdm=False)
    hits = [st.keyword_hit(o.outputs[0].text.strip(), e["keywords"]) for e, o in zip(items, outs)]
    return sum(hits) / len(hits), hits


def _stories(llm):
    import re

    from minke import SamplingParams

    topics = multi_turn.stories.TOPICS
    outs = llm.chat([[{"role": "user", "content": f"Tell me a story about the {t}."}] for t in topics],
                    SamplingParams(temperature=0.0, max_tokens=300), use_tqdm=False)
    ok = [bool(re.search(rf"\b{t}\b", o.outputs[0].text, re.I)) and o.outputs[0].finish_reason == "stop"
          for t, o in zip(topics, outs)]
    return sum(ok), ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out_dir", type=Path, required=True)
    ap.add_argument("--base", default=str(SHIPPED), help="model to start from (default: the shipped one)")
    ap.add_argument("--device", default="cuda", help="cuda | cpu")
    ap.add_argument("--num_conversations", type=int, default=3000)
    ap.add_argument("--num_small_talk", type=int, default=3000,
                    help="small-talk replay rows (1,500 cost 0.07 of the small-talk score on an H200 run; 3,000 kept it)")
    ap.add_argument("--num_story_requests", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--learning_rate", default="2e-4")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    ap.add_argument("--seed", type=int, default=24)
    ap.add_argument("--target_multi_turn", type=int, default=16, help="third answers on topic, of 24")
    ap.add_argument("--skip_eval", action="store_true", help="train only")
    ap.add_argument("--eval_device", default="cpu", help="where the evaluations run (default cpu: the tests' "
                    "numbers are CPU greedy decodes)")
    a = ap.parse_args(argv)
    data = a.out_dir / "multi_turn_sft.jsonl"
    counts = build_data(data, a.num_conversations, a.num_small_talk, a.num_story_requests, a.seed)
    print("data:", counts, "->", data, flush=True)
    model_out = a.out_dir / "model"
    cmd = [sys.executable, "-m", "minke.cli", "finetune", "--model_name_or_path", a.base, "--data_path", str(data),
           "--output_dir", str(model_out), "--device", a.device, "--model_max_length", "512",
           "--per_device_train_batch_size", str(a.batch_size), "--gradient_accumulation_steps", "1",
           "--num_train_epochs", str(a.epochs), "--learning_rate", a.learning_rate, "--lr_scheduler_type", "cosine",
           "--warmup_steps", "10", "--weight_decay", "0.0", "--max_grad_norm", "1.0", "--logging_steps", "10",
           "--save_steps", "100000", "--save_total_limit", "1", "--seed", str(a.seed),
           "--overwrite_output_dir", "True"]
    if a.max_steps:
        cmd += ["--max_steps", str(a.max_steps)]
    print("+", " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(f"fine-tuned in {time.perf_counter() - t:.0f}s -> {model_out}", flush=True)
    if a.skip_eval:
        return 0
    before, after = evaluate(a.base, a.eval_device), evaluate(str(model_out), a.eval_device)
    report = {"data": counts, "command": cmd, "before": before, "after": after}
    (a.out_dir / "eval.json").write_text(json.dumps(report, indent=1))
    for k in ("multi_turn", "small_talk", "stories_on_topic"):
        print(f"{k:18s} before {before[k]}  after {after[k]}")
    ok = (after["multi_turn"] >= a.target_multi_turn and after["small_talk"] >= before["small_talk"] - 0.05
          and after["stories_on_topic"] >= 40)
    print("targets met" if ok else "targets NOT met", f"(multi-turn >= {a.target_multi_turn}/24, small talk >= "
          f"{before['small_talk'] - 0.05:.2f}, stories >= 40/50)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
