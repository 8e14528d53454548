"""lm-evaluation-harness against `minke serve` on the embedded default model: /v1/completions with echo and
logprobs (OpenAI's legacy shape) checked against transformers' full-sequence log_softmax, then lm-eval itself
(`local-completions`) on multiple_choice, loglikelihood_rolling and generate_until tasks made from local JSONL
files, request by request equal to lm-eval's `hf` backend on the same checkpoint (fp32): the same loglikelihoods
and the same greedy generations."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

from minke.default_model import default_model_dir
from test_server import launch_server, stop_server

MODEL = "minke-default"
TOL = 1e-4  # fp32 logprob of one token, engine vs transformers


@pytest.fixture(scope="module")
def model_dir() -> str:
    return default_model_dir()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    log = tmp_path_factory.mktemp("lm-eval-serve") / "serve.log"
    # max_num_batched_tokens 16: most prompts are scored over several chunks
    proc, url = launch_server(["--served-model-name", MODEL, "--dtype", "float32", "--device", "cpu",
                               "--max-num-batched-tokens", "16"], log)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # [T, V]


def complete(base: str, **body) -> dict:
    r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "temperature": 0, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------------------- the shape

def test_echo_logprobs_legacy_shape(base, hf):
    model, tok = hf
    ids = tok.encode("Once upon a time, a little fox found a red ball in the tall grass and it was happy.")
    assert len(ids) > 16  # more than one prefill chunk
    body = complete(base, prompt=ids, max_tokens=1, echo=True, logprobs=1)  # what lm-eval sends
    choice = body["choices"][0]
    lp = choice["logprobs"]
    n = len(ids) + 1  # the prompt, then the generated token
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = hf_logprobs(model, ids)
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=TOL)
        best = int(ref[i - 1].argmax())
        top = lp["top_logprobs"][i]
        assert top[tok.decode([best])] == pytest.approx(float(ref[i - 1, best]), abs=TOL)
        assert 1 <= len(top) <= 2  # the top-1 and the token itself
    # the generated token: greedy, its logprob from the last prompt position
    gen = int(ref[-1].argmax())
    assert lp["token_logprobs"][-1] == pytest.approx(float(ref[-1, gen]), abs=TOL)
    assert lp["tokens"][-1] == tok.decode([gen])
    # text_offset: where each token's text starts, counting from the echoed prompt's first token
    assert lp["text_offset"][0] == 0
    assert all(lp["text_offset"][i + 1] == lp["text_offset"][i] + len(lp["tokens"][i]) for i in range(n - 1))
    # the echoed prompt, then the generated text (none when the greedy token is eos)
    assert choice["text"] == tok.decode(ids) + ("" if gen == tok.eos_token_id else tok.decode([gen]))
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}


def test_echo_with_max_tokens_zero_scores_the_prompt_only(base, hf):
    model, tok = hf
    ids = tok.encode("The cat sat on the mat.")
    body = complete(base, prompt=ids, max_tokens=0, echo=True, logprobs=2)
    choice = body["choices"][0]
    assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    ref = hf_logprobs(model, ids)
    assert lp["token_logprobs"][1:] == pytest.approx([float(ref[i - 1, ids[i]]) for i in range(1, len(ids))],
                                                     abs=TOL)
    assert body["usage"]["completion_tokens"] == 0
    # echo without logprobs, max_tokens 0: the prompt alone; max_tokens 0 without echo is refused, naming it
    assert complete(base, prompt=ids, max_tokens=0, echo=True)["choices"][0]["text"] == tok.decode(ids)
    r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_streamed_echo_logprobs_equal_the_whole_answer(base, hf):
    _, tok = hf
    ids = tok.encode("A small boat on a quiet lake.")
    whole = complete(base, prompt=ids, max_tokens=4, echo=True, logprobs=1, ignore_eos=True)["choices"][0]
    tokens, lps, offsets, text = [], [], [], ""
    with httpx.stream("POST", f"{base}/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": ids, "max_tokens": 4, "echo": True, "logprobs": 1,
                            "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])["choices"][0]
            text += c["text"]
            if c["logprobs"]:
                tokens += c["logprobs"]["tokens"]
                lps += c["logprobs"]["token_logprobs"]
                offsets += c["logprobs"]["text_offset"]
    assert text == whole["text"]
    assert tokens == whole["logprobs"]["tokens"] and offsets == whole["logprobs"]["text_offset"]
    assert lps[0] is None and lps[1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=1e-6)


def test_prompt_logprobs_field_on_completions_and_chat(base, hf):
    model, tok = hf
    ids = tok.encode("Birds sing in the morning.")
    choice = complete(base, prompt=ids, max_tokens=1, prompt_logprobs=2)["choices"][0]
    got = choice["prompt_logprobs"]
    ref = hf_logprobs(model, ids)
    assert len(got) == len(ids) and got[0] is None
    for i in range(1, len(ids)):
        entry = got[i]  # {"token id": {"logprob", "rank", "decoded_token"}}: the token itself and the top 2
        own = entry[str(ids[i])]
        assert own["logprob"] == pytest.approx(float(ref[i - 1, ids[i]]), abs=TOL)
        assert own["decoded_token"] == tok.decode([ids[i]])
        assert sorted(e["rank"] for e in entry.values())[:2] == [1, 2]
    r = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                         "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    chat = r.json()["prompt_logprobs"]
    assert chat[0] is None and all(len(e) == 1 for e in chat[1:])
    # the plain answers carry no prompt logprobs
    assert complete(base, prompt=ids, max_tokens=1)["choices"][0]["prompt_logprobs"] is None


# ------------------------------------------------------------------------------------------------- lm-eval

MC = [  # story comprehension, multiple choice
    ("Tom has a red ball. What color is Tom's ball?", ["blue", "red", "green"], 1),
    ("The sun goes down at night. When does the sun go down?", ["at night", "in the morning"], 0),
    ("Lily likes to read books. What does Lily like?", ["books", "cars", "rain", "fish"], 0),
]
TEXTS = ["Once upon a time there was a little girl who lived in a small house near the woods.",
         "The dog ran to the park. He played with a stick and then he went home to sleep."]
GEN = [("Once upon a time", "."), ("The little cat", ".")]


def _tasks(tmp_path) -> str:
    def write(name, rows):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    mc = write("mc", [{"question": q, "choices": c, "answer": a} for q, c, a in MC])
    ppl = write("ppl", [{"text": t} for t in TEXTS])
    gen = write("gen", [{"prompt": p, "answer": a} for p, a in GEN])
    common = "dataset_path: json\ntest_split: train\n"
    (tmp_path / "mc.yaml").write_text(
        f"task: minke_mc\n{common}dataset_kwargs:\n  data_files: {mc}\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "ppl.yaml").write_text(
        f"task: minke_ppl\n{common}dataset_kwargs:\n  data_files: {ppl}\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n")
    (tmp_path / "gen.yaml").write_text(
        f"task: minke_gen\n{common}dataset_kwargs:\n  data_files: {gen}\noutput_type: generate_until\n"
        "doc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n")
    return str(tmp_path)


def _per_request(results) -> dict[str, list]:
    """task -> the responses of its requests, in document and request order."""
    out = {}
    for task, samples in results["samples"].items():
        out[task] = [r for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["resps"]]
    return out


def test_lm_eval_local_completions_equals_hf_backend(base, model_dir, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = ["minke_mc", "minke_ppl", "minke_gen"]
    # bos first on both sides, as the DeepSeek models are trained (HFLM's default follows the tokenizer; the API
    # model's does not add it)
    manager = TaskManager(include_path=_tasks(tmp_path), include_defaults=False)
    served = lm_eval.simple_evaluate(
        model="local-completions", tasks=tasks, task_manager=manager, log_samples=True,
        model_args={"model": MODEL, "base_url": f"{base}/v1/completions", "tokenizer_backend": "huggingface",
                    "tokenizer": model_dir, "max_retries": 1, "max_length": 1024, "add_bos_token": True})
    local = lm_eval.simple_evaluate(
        model="hf", tasks=tasks, task_manager=manager, log_samples=True, batch_size=1,
        model_args={"pretrained": model_dir, "dtype": "float32", "device": "cpu", "add_bos_token": True})
    got, ref = _per_request(served), _per_request(local)
    n_mc = sum(len(c) for _, c, _ in MC)
    assert len(got["minke_mc"]) == len(ref["minke_mc"]) == n_mc
    for g, r in zip(got["minke_mc"], ref["minke_mc"]):  # [(loglikelihood, is_greedy)] per choice
        assert g[0][0] == pytest.approx(r[0][0], abs=TOL * 10) and g[0][1] == r[0][1]
    assert len(got["minke_ppl"]) == len(TEXTS)
    for g, r in zip(got["minke_ppl"], ref["minke_ppl"]):  # the whole text's loglikelihood
        assert g[0] == pytest.approx(r[0], abs=TOL * 100) and math.isfinite(g[0])
    assert got["minke_gen"] == ref["minke_gen"] and all(g[0] for g in got["minke_gen"])
    for task in tasks:
        for metric, value in local["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert served["results"][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
