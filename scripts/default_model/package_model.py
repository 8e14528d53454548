"""Package the fine-tuned default model into minke/assets/default_model/: bf16 weights, config, tokenizer,
generation_config.json, and a README.md model card whose numbers (size, held-out loss) and sample outputs are
measured here on the packaged files, not written by hand.

Usage: python scripts/default_model/package_model.py --model_dir build/default_model/finetuned \\
           --data_dir build/default_model/data --commands build/default_model/commands.txt --out_dir DIR
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHIPPED_LIMIT_BYTES = 20 * 1000 * 1000
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Sampling defaults for the default model: a small model loops under greedy decoding, so sample mildly.
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}
SAMPLE_SEED = 1234
COMPLETION_PROMPTS = ("Once upon a time", "It was a fine morning, and", "My dear sister,")
CHAT_PROMPTS = ("Hello, how are you?", "What is your name?", "Tell me a story about a cat.",
                "Tell me a story about a garden.", "What is your favorite book?")


def package_weights(model_dir: Path, out_dir: Path) -> dict:
    """Cast every tensor to bf16 (the dtype DeepSeek ships) and write config.json with torch_dtype bfloat16."""
    tensors = load_file(str(model_dir / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def heldout_loss(out_dir: Path, valid_file: Path, block: int = 256) -> tuple[float, int]:
    """Mean next-token cross-entropy of the packaged model (fp32 compute) on held-out documents ({"text"} rows)."""
    from minke import load_model, load_tokenizer

    model = load_model(str(out_dir), dtype=torch.float32, device="cpu").eval()
    tok = load_tokenizer(str(out_dir))
    total, count = 0.0, 0
    with torch.no_grad():
        for line in valid_file.read_text(encoding="utf-8").splitlines():
            ids = tok.encode(json.loads(line)["text"])[:block]
            if len(ids) < 2:
                continue
            x = torch.tensor([ids])
            logits = model(x)[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += len(ids) - 1
    return total / count, count


def samples(out_dir: Path) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    from minke import LLM, SamplingParams

    llm = LLM(str(out_dir))
    sampled = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.1, max_tokens=80, seed=SAMPLE_SEED)
    greedy = SamplingParams(temperature=0.0, max_tokens=60)
    comp = []
    for p in COMPLETION_PROMPTS:
        comp.append((p, "sampled, temperature 0.7", llm.generate(p, sampled, use_tqdm=False)[0].outputs[0].text))
    comp.append((COMPLETION_PROMPTS[0], "greedy", llm.generate(COMPLETION_PROMPTS[0], greedy, use_tqdm=False)[0]
                 .outputs[0].text))
    chat = []
    for p in CHAT_PROMPTS:
        out = llm.chat([{"role": "user", "content": p}], sampled, use_tqdm=False)[0].outputs[0]
        chat.append((p, out.finish_reason, out.text))
    return comp, chat


def on_topic_rate(out_dir: Path, topics: list[str]) -> tuple[int, int]:
    """Greedy "Tell me a story about the X." for every grammar topic: how many answers name X and end with eos
    (the rule tests/test_default_model.py checks)."""
    import re

    from minke import LLM, SamplingParams

    llm = LLM(str(out_dir))
    convs = [[{"role": "user", "content": f"Tell me a story about the {t}."}] for t in topics]
    outs = llm.chat(convs, SamplingParams(temperature=0.0, max_tokens=300), use_tqdm=False)
    hits = sum(bool(re.search(rf"\b{t}\b", o.outputs[0].text, re.I)) and o.outputs[0].finish_reason == "stop"
               for t, o in zip(topics, outs))
    return hits, len(topics)


def small_talk_eval(out_dir: Path) -> tuple[float, list[dict]]:
    """The held-out small-talk eval of small_talk.py (greedy chat answers, keyword score) on the packaged model."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("small_talk", Path(__file__).with_name("small_talk.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.evaluate(str(out_dir))


def small_talk_lines(score: float, results: list[dict]) -> list[str]:
    """The card's small-talk paragraph and its table of every held-out answer (small_talk.py's evaluation)."""
    cats: dict[str, list[bool]] = {}
    for r in results:
        cats.setdefault(r["category"], []).append(r["hit"])
    return [
        f"Small talk: {sum(r['hit'] for r in results)} of {len(results)} held-out prompts "
        f"(`scripts/default_model/small_talk_eval.json`, phrasings the training never asked) get a greedy answer "
        f"that contains an accepted keyword (score {score:.2f}; "
        + ", ".join(f"{c} {sum(h)}/{len(h)}" for c, h in cats.items())
        + "), measured by `python scripts/default_model/small_talk.py --eval minke/assets/default_model "
        "--stories` (which also counts the on-topic stories above). "
        "Every answer (greedy, max 80 new tokens, unedited; [x] = keyword found):",
        "",
        "| | prompt | answer |",
        "| --- | --- | --- |",
        *[f"| {'x' if r['hit'] else ' '} | {r['prompt']} | {r['answer'].replace(chr(10), ' / ').replace('|', '/')} |"
          for r in results],
        "",
    ]


def model_card(cfg: dict, stats: dict, sizes: dict, n_params: int, loss: tuple[float, int], commands: list[str],
               comp, chat, trained_on: str, topic_rate: tuple[int, int], st_stats: list[dict] | None = None,
               st_eval: tuple[float, list[dict]] | None = None) -> str:
    def q(text: str) -> str:
        return "> " + text.strip().replace("\n", "\n> ")

    total = sum(sizes.values())
    lines = [
        "# minke default model",
        "",
        "A small chat model of the DeepSeek-V2 architecture (`deepseek_v2`: Multi-head Latent Attention + "
        "DeepSeekMoE) that ships inside the minke package and runs whenever no model is given (`minke chat`, "
        "`minke serve`, `minke generate`, `LLM()`). It was pretrained from scratch with `minke train` on short, "
        "simple English stories and then fine-tuned on dialogues with `minke finetune`"
        + (" (and last on generated small talk)" if st_stats else "") + ". It is a toy: it tells "
        "simple children's stories about the thing asked and answers small talk, within a small vocabulary of "
        "animals, objects and everyday words. Use it to try minke without downloading anything, not for answers.",
        "",
        "Known limits: the stories come from a small hand-written grammar, so the model knows about "
        f"{len(stats['topics'])} topics and a few story shapes; outside them it falls back on the same phrases. "
        + ("Small talk comes from hand-written templates (who it is, greetings, ~100 simple facts, sums up to "
           "ten, a few jokes and poems) and an honest \"I don't know\" otherwise; questions phrased far from "
           "those templates still get wrong or off-topic answers, and sums are not learned (see the evaluation)."
           if st_stats else "Small talk comes from ~1,000 ChatterBot pairs and is shallow."),
        "",
        "## Architecture",
        "",
        "| | |",
        "| --- | --- |",
        f"| parameters | {n_params / 1e6:.2f} M (bf16) |",
        f"| layers | {cfg['num_hidden_layers']} (first {cfg['first_k_dense_replace']} dense, the rest MoE) |",
        f"| hidden size | {cfg['hidden_size']} |",
        f"| attention | MLA: {cfg['num_attention_heads']} heads, kv_lora_rank {cfg['kv_lora_rank']}, "
        f"qk_nope {cfg['qk_nope_head_dim']} + qk_rope {cfg['qk_rope_head_dim']}, v {cfg['v_head_dim']}, "
        f"no q_lora |",
        f"| MoE | {cfg['n_routed_experts']} routed experts (width {cfg['moe_intermediate_size']}), top-"
        f"{cfg['num_experts_per_tok']} greedy, {cfg['n_shared_experts']} shared expert; dense MLP width "
        f"{cfg['intermediate_size']} |",
        f"| vocabulary | {cfg['vocab_size']} (byte-level BPE trained on the corpus; bos "
        f"`<｜begin▁of▁sentence｜>` = {cfg['bos_token_id']}, eos `<｜end▁of▁sentence｜>` = {cfg['eos_token_id']}) |",
        f"| context | {cfg['max_position_embeddings']} positions (trained on 256-token blocks / 384-token dialogues) |",
        "| chat template | DeepSeek's: `<bos>{system}\\n\\nUser: {u}\\n\\nAssistant: {a}<eos>User: ...` |",
        "",
        "## Files and size",
        "",
        "| file | bytes |",
        "| --- | --- |",
        *[f"| {name} | {size:,} |" for name, size in sorted(sizes.items())],
        f"| **total** | **{total:,}** ({total / 1e6:.2f} MB) |",
        "",
        "## Training data and licences",
        "",
        "- **Pretraining**: "
        f"{stats['stories']:,} short stories generated by `scripts/default_model/simple_stories.py`, a small "
        "hand-written grammar in this repository (Apache-2.0): a child or an animal, a place, a wish or a problem, "
        "who helps, how it ends, sometimes a line of dialogue and a moral, each story about one of "
        f"{len(stats['topics'])} topics ({', '.join(stats['topics'][:12])}, ...). No simple-English story corpus "
        "ships in a package this project can install offline, and a 9M-parameter model does not become fluent "
        "on 19th-century novels (an earlier build pretrained on Jane Austen's novels wrote Austen-like "
        "non-words).",
        "- **Fine-tuning dialogues** (" + f"{stats['sft_examples']:,} examples" + "):",
        f"  - {stats['chatterbot_pairs']:,} statement/reply pairs from the English part of ChatterBot's dialogue "
        "corpus, PyPI package `chatterbot-corpus` 1.3.3 (Gunther Cox, BSD-3-Clause), categories other than "
        f"`coding` and `tech_support`, each pair seen {stats['chatterbot_repeats']}x;",
        f"  - {stats['story_requests']:,} story requests (\"Tell me a story about a cat.\") answered with a "
        "generated story about that topic;",
        f"  - {stats['continue_examples']:,} \"continue the story\" requests answered with the rest of a "
        "generated story.",
        *([f"- **Small-talk passes** ({len(st_stats)} more `minke finetune` epochs, "
           f"{sum(st['sft_examples'] for st in st_stats):,} examples): "
           f"{sum(st['small_talk'] for st in st_stats):,} small-talk pairs generated by "
           "`scripts/default_model/small_talk.py` (the first four passes by its earlier version, kept as "
           "`small_talk_round1.py`) from templates written for this repository (own text, "
           "Apache-2.0; no outside corpus): greetings, who the model is (\"I am Minke, a small story-telling "
           "model.\"), what it can do, thanks and goodbyes, likes, simple facts (colours, animal sounds and legs, "
           "days and months, capitals, opposites), sums of two small numbers (answers computed; to 10 + 10 in "
           "digits in round one, to ten in words since), short "
           "jokes, two-line poems, \"tell me about X\" and an honest fallback (\"I am a small model and I don't "
           "know that.\"); per pass: "
           + "; ".join(f"pass {i + 1}: {st['small_talk']:,} small-talk pairs"
                       + (f" + {st['story_requests']:,} story requests replayed" if st["story_requests"] else "")
                       + (f" + {st['continue_examples']:,} continuations" if st["continue_examples"] else "")
                       + (f" + {st['chatterbot_pairs']:,} ChatterBot pairs"
                          + (f" x{st['chatterbot_repeats']}" if st["chatterbot_repeats"] > 1 else "")
                          if st["chatterbot_repeats"] else "")
                       for i, st in enumerate(st_stats)) + "."] if st_stats else []),
        "- **Tokenizer**: byte-level BPE (4096 tokens) trained on Jane Austen's six novels (public domain, from the "
        "Debian package `r-cran-janeaustenr`, MIT) and the ChatterBot pairs by `scripts/default_model/"
        "train_tokenizer.py`.",
        "",
        "The weights are released under minke's licence (Apache-2.0); the data licences above allow it.",
        "",
        "## Evaluation",
        "",
        f"Held-out generated stories ({loss[1]:,} tokens, a random stream the training never saw): cross-entropy "
        f"{loss[0]:.3f} nats/token, "
        f"perplexity {math.exp(loss[0]):.1f} (measured on the packaged bf16 weights by "
        "`scripts/default_model/package_model.py`).",
        "",
        f"On topic: asked (greedy) \"Tell me a story about the X.\" for each of the {topic_rate[1]} grammar topics, "
        f"{topic_rate[0]} answers name X and end by themselves."
        + ("" if st_eval else " Small talk is shallow (see the samples)."),
        "",
        "## Sample outputs",
        "",
        f"Produced by `scripts/default_model/package_model.py` with minke on CPU (seed {SAMPLE_SEED}, "
        "max 80 new tokens; sampled with temperature 0.7, top_p 0.9, repetition_penalty 1.1). Unedited.",
        "",
    ]
    if st_eval:
        lines[lines.index("## Sample outputs"):lines.index("## Sample outputs")] = small_talk_lines(*st_eval)
    for prompt, how, text in comp:
        lines += [f"**Completion** of `{prompt}` ({how}):", "", q(prompt + text), ""]
    for prompt, reason, text in chat:
        lines += [f"**Chat**: User: *{prompt}* (finish: {reason})", "", q(text), ""]
    lines += [
        "## How it was built",
        "",
        "`bash scripts/build_default_model.sh` runs every step, from fetching the corpora to writing this "
        "directory (see the script's header for running single stages). The steps it ran:",
        "",
        "```",
        *commands,
        "```",
        "",
        f"This build's pretraining and fine-tuning ran on {trained_on}. minke trains on CUDA when a GPU is present; "
        "the same commands run on a CPU, only slower (about 2,500 tokens/s for this model on 2 CPU cores).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_dir", type=Path, required=True, help="the `minke finetune` output directory")
    ap.add_argument("--stories_dir", type=Path, required=True,
                    help="simple_stories.py + mix_sft.py output (stats.json, sft_stats.json, stories_valid.jsonl)")
    ap.add_argument("--commands", type=Path, required=True, help="the commands the build ran, one a line")
    ap.add_argument("--out_dir", type=Path, required=True)
    ap.add_argument("--trained_on", default="one GPU", help="the hardware the training ran on, for the card")
    a = ap.parse_args(argv)
    for f in ("config.json", "model.safetensors", *TOKENIZER_FILES[:2]):
        if not (a.model_dir / f).is_file():
            raise SystemExit(f"{a.model_dir / f} not found: is --model_dir a finished `minke finetune` output?")
    if a.out_dir.exists():
        shutil.rmtree(a.out_dir)
    a.out_dir.mkdir(parents=True)

    cfg = package_weights(a.model_dir, a.out_dir)
    for f in TOKENIZER_FILES:
        if (a.model_dir / f).is_file():
            shutil.copy(a.model_dir / f, a.out_dir / f)
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], **GENERATION_DEFAULTS}
    (a.out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    sizes = {f: os.path.getsize(a.out_dir / f) for f in sorted(os.listdir(a.out_dir))}
    if sum(sizes.values()) > SHIPPED_LIMIT_BYTES:
        raise SystemExit(f"packaged model is {sum(sizes.values()):,} bytes, over the {SHIPPED_LIMIT_BYTES:,} limit")
    n_params = sum(t.numel() for t in load_file(str(a.out_dir / "model.safetensors")).values())
    stats = {**json.loads((a.stories_dir / "stats.json").read_text()),
             **json.loads((a.stories_dir / "sft_stats.json").read_text())}
    loss = heldout_loss(a.out_dir, a.stories_dir / "stories_valid.jsonl")
    comp, chat = samples(a.out_dir)
    commands = [c.replace(str(Path.cwd()) + os.sep, "") for c in a.commands.read_text().splitlines() if c.strip()]
    topic_rate = on_topic_rate(a.out_dir, stats["topics"])
    # The small-talk passes (build stage "smalltalk") write sft_smalltalk*_stats.json beside sft_stats.json.
    st_files = sorted(a.stories_dir.glob("sft_smalltalk*_stats.json"), key=lambda f: (len(f.name), f.name))
    st_stats = [json.loads(f.read_text()) for f in st_files] or None
    st_eval = small_talk_eval(a.out_dir) if st_stats else None
    card = model_card(cfg, stats, sizes, n_params, loss, commands, comp, chat, a.trained_on, topic_rate, st_stats,
                      st_eval)
    (a.out_dir / "README.md").write_text(card, encoding="utf-8")
    print(card)


if __name__ == "__main__":
    main()
