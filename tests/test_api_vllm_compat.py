"""vLLM code runs unchanged with `from vllm import` -> `from minke import` (issue 24, item 1): the DeepSeek-V2
README's offline snippet (seed 003, "Inference with vLLM") verbatim, and vLLM's prompt forms."""

from __future__ import annotations

import pytest

from minke import LLM, SamplingParams
from minke.default_model import default_model_dir

# The README's snippet, verbatim but for: the import line (vllm -> minke), the model (the embedded default model,
# a local chat checkpoint: nothing is downloaded) and the sizes (one CPU process instead of 8 GPUs; the default
# model's context is 1024 positions, and --max-model-len above it is refused).
README_SNIPPET = '''
from transformers import AutoTokenizer
from minke import LLM, SamplingParams
max_model_len, tp_size = 512, 1
model_name = MODEL_DIR
tokenizer = AutoTokenizer.from_pretrained(model_name)
llm = LLM(model=model_name, tensor_parallel_size=tp_size, max_model_len=max_model_len, trust_remote_code=True, enforce_eager=True)
sampling_params = SamplingParams(temperature=0.3, max_tokens=256, stop_token_ids=[tokenizer.eos_token_id])
messages_list = [
[{"role": "user", "content": "Who are you?"}],
[{"role": "user", "content": "Translate the following content into Chinese directly: DeepSeek-V2 adopts innovative architectures to guarantee economical training and efficient inference."}],
[{"role": "user", "content": "Write a piece of quicksort code in C++."}],
]
prompt_token_ids = [tokenizer.apply_chat_template(messages, add_generation_prompt=True) for messages in messages_list]
outputs = llm.generate(prompt_token_ids=prompt_token_ids, sampling_params=sampling_params)
generated_text = [output.outputs[0].text for output in outputs]
print(generated_text)
'''

GREEDY = SamplingParams(temperature=0, max_tokens=6)


@pytest.fixture(scope="module")
def llm():
    return LLM(default_model_dir(), device="cpu", kv_cache_tokens=2048, max_num_seqs=8)


def test_deepseek_v2_readme_vllm_snippet_runs_unchanged(capsys):
    pytest.importorskip("transformers")
    ns = {"MODEL_DIR": default_model_dir()}
    exec(compile(README_SNIPPET, "deepseek-v2-readme-snippet", "exec"), ns)
    outputs, llm = ns["outputs"], ns["llm"]
    assert len(outputs) == 3 and llm.max_model_len == 512
    # transformers >= 5 hands apply_chat_template's BatchEncoding over: each prompt is its input_ids, the same ids
    # minke's own chat template gives.
    tok = llm.get_tokenizer()
    for out, messages in zip(outputs, ns["messages_list"]):
        assert out.prompt_token_ids == tok.apply_chat_template(messages, add_generation_prompt=True)
        assert out.outputs[0].finish_reason in ("stop", "length")
        assert out.outputs[0].token_ids and len(out.outputs[0].token_ids) <= 256
    assert str(ns["generated_text"]) in capsys.readouterr().out


def test_prompt_token_ids_keyword_and_prompt_dicts_match_plain_prompts(llm):
    tok = llm.get_tokenizer()
    texts = ["Once upon a time", "The cat sat"]
    ids = [tok.encode(t) for t in texts]
    want = [o.outputs[0].token_ids for o in llm.generate(texts, GREEDY, use_tqdm=False)]
    forms = {
        "prompt_token_ids=[[...]]": llm.generate(prompt_token_ids=ids, sampling_params=GREEDY, use_tqdm=False),
        "list of token-id dicts": llm.generate([{"prompt_token_ids": i} for i in ids], GREEDY, use_tqdm=False),
        "list of text dicts": llm.generate([{"prompt": t} for t in texts], GREEDY, use_tqdm=False),
        "mixed list": llm.generate([{"prompt": texts[0]}, ids[1]], GREEDY, use_tqdm=False),
    }
    for name, outs in forms.items():
        assert [o.outputs[0].token_ids for o in outs] == want, name
    # a single prompt of each form is one prompt, not a list of them
    for single in (texts[0], ids[0], {"prompt": texts[0]}, {"prompt_token_ids": ids[0]}):
        outs = llm.generate(single, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want[:1], single
    outs = llm.generate(prompt_token_ids=ids[0], sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want[:1]


def test_generate_bad_calls_name_the_problem(llm):
    with pytest.raises(ValueError, match="not both"):
        llm.generate("x", GREEDY, prompt_token_ids=[[1, 2]])
    with pytest.raises(ValueError, match="needs prompts"):
        llm.generate(sampling_params=GREEDY)
    with pytest.raises(TypeError, match="prompt_token_ids\\[1\\] must be a list of token ids"):
        llm.generate(prompt_token_ids=[[1, 2], "text"], sampling_params=GREEDY)
    with pytest.raises(TypeError, match="prompts must be"):
        llm.generate(42, GREEDY)
    with pytest.raises(ValueError, match="prompt 1: a prompt dict holds"):
        llm.generate([{"prompt": "a"}, {"text": "b"}], GREEDY)
    with pytest.raises(TypeError, match="sampling_params\\[0\\] must be a SamplingParams"):
        llm.generate(["a"], [dict(temperature=0)])
