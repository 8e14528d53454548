"""LoRA adapters through `minke serve --enable-lora --lora-modules NAME=PATH` with the official openai client: the
request's model picks the adapter (its tokens equal the merged model's), concurrent requests of the base and two
adapters equal each alone, /v1/models lists adapters with the base as parent, adapters load and unload at run time
(behind the API key), a wrong name is a 404 and an unservable adapter a 400 naming why while serving goes on."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from minke import LLM, SamplingParams
from lora_assets import LoRAAssets
from test_server import launch_server, stop_server

API_KEY = "sk-lora-test"
MODEL = "tiny-v2"
ENGINE = dict(device="cpu", kv_cache_tokens=4096)
PROMPTS = ["Once upon a time", "The capital of France is", "def quicksort("]
N = 8


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return LoRAAssets(tmp_path_factory.mktemp("lora-server"))


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory):
    base = assets("deepseek_v2_lite")
    one, _ = assets.adapter("deepseek_v2_lite", seed=1)
    log = tmp_path_factory.mktemp("lora-log") / "serve.log"
    proc, url = launch_server([base, "--device", "cpu", "--kv-cache-tokens", "4096", "--served-model-name", MODEL,
                               "--api-key", API_KEY, "--enable-lora", "--lora-modules", f"one={one}",
                               "--max-loras", "2", "--max-lora-rank", "8", "--async-scheduling"], log)
    yield {"base": url, "log": log}
    stop_server(proc)


def _want(path: str) -> list[str]:
    outs = LLM(path, **ENGINE).generate(PROMPTS, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True),
                                        use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def _post(server, route: str, body: dict, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server['base']}/v1/{route}", json=body, headers=headers, timeout=60)


def test_adapters_through_the_server(server, assets):
    base = assets("deepseek_v2_lite")
    _, merged1 = assets.adapter("deepseek_v2_lite", seed=1)
    two, merged2 = assets.adapter("deepseek_v2_lite", seed=2)
    want = {MODEL: _want(base), "one": _want(merged1), "two": _want(merged2)}
    client = openai.OpenAI(base_url=f"{server['base']}/v1", api_key=API_KEY, max_retries=0, timeout=60)

    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {MODEL, "one"} and cards["one"].parent == MODEL

    # loaded at run time: behind the API key, then served and listed
    assert _post(server, "load_lora_adapter", {"lora_name": "two", "lora_path": two}, key=None).status_code == 401
    r = _post(server, "load_lora_adapter", {"lora_name": "two", "lora_path": two})
    assert r.status_code == 200, r.text
    assert {m.id for m in client.models.list().data} == {MODEL, "one", "two"}

    async def one(aclient, model, prompt):
        c = await aclient.completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0,
                                             extra_body={"ignore_eos": True})
        assert c.model == model
        return c.choices[0].text

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{server['base']}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as aclient:
            jobs = [(m, i) for i in range(len(PROMPTS)) for m in want]  # base and both adapters interleaved
            texts = await asyncio.gather(*(one(aclient, m, PROMPTS[i]) for m, i in jobs))
            return {(m, i): t for (m, i), t in zip(jobs, texts)}

    got = asyncio.run(run_all())
    for m, texts in want.items():
        assert [got[(m, i)] for i in range(len(PROMPTS))] == texts, m
    assert want["one"] != want[MODEL] and want["two"] != want["one"]

    chat = client.chat.completions.create(model="two", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert chat.model == "two" and chat.choices[0].message.content is not None

    # unload: the name is gone (404), as is an unknown one
    assert _post(server, "unload_lora_adapter", {"lora_name": "two"}).status_code == 200
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="two", prompt="x", max_tokens=2)
    r = _post(server, "unload_lora_adapter", {"lora_name": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_unservable_adapters_are_400s_and_serving_goes_on(server, assets, tmp_path):
    big, _ = assets.adapter("deepseek_v2_lite", seed=3, r=16)
    r = _post(server, "load_lora_adapter", {"lora_name": "big", "lora_path": big})
    assert r.status_code == 400 and "max_lora_rank 8" in r.json()["error"]["message"]
    dense, _ = assets.adapter("llama", seed=1)
    r = _post(server, "load_lora_adapter", {"lora_name": "dense", "lora_path": dense})
    assert r.status_code == 400 and "cannot serve adapters on" in r.json()["error"]["message"]
    r = _post(server, "load_lora_adapter", {"lora_name": "missing", "lora_path": str(tmp_path / "nothing")})
    assert r.status_code == 400 and "not a directory" in r.json()["error"]["message"]
    r = _post(server, "load_lora_adapter", {"lora_name": "one", "lora_path": big})
    assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
    client = openai.OpenAI(base_url=f"{server['base']}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert {m.id for m in client.models.list().data} >= {MODEL, "one"}
    assert "big" not in {m.id for m in client.models.list().data}
    assert client.completions.create(model="one", prompt="Hello", max_tokens=2).choices[0].text is not None
