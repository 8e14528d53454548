"""Structured outputs offline (SamplingParams(structured_outputs=StructuredOutputsParams(...))) on the embedded
default model, a story model: without the constraint its samples are never JSON, so every valid output below is
the grammar's doing. Temperature 1, many seeds, jsonschema as the judge; regex, choice, EBNF and json_object;
n > 1 (a matcher per sequence); max_tokens inside the grammar ends with "length"; async scheduling (the mask of
step k+1 filled after step k's tokens) gives the tokens of synchronous stepping; preemption keeps the matchers;
the bitmask kernel against its torch reference; the compile cache."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

pytest.importorskip("xgrammar")

from minke import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from minke.runner.sampler import Sampler, SamplingBatch, apply_token_bitmask, apply_token_bitmask_ref  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "fish"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
        "alive": {"type": "boolean"},
    },
    "required": ["name", "age", "pet", "alive"],
}
PROMPTS = ["Once upon a time", "The little dog", "Tom and Lily went to the park.", "One day"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model's steps are ~10x faster on one intra-op thread than on threads that fight xgrammar's (and a
    # shared machine's) for the cores.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", max_model_len=384, async_scheduling=True)


def _params(so: StructuredOutputsParams, seed: int, max_tokens: int = 256, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed, structured_outputs=so, **kw)


def test_json_schema_every_seed_validates(llm):
    so = StructuredOutputsParams(json=PERSON)
    seeds = range(12)
    prompts = [PROMPTS[s % len(PROMPTS)] for s in seeds]
    outs = llm.generate(prompts, [_params(so, s) for s in seeds], use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    for o, text in zip(outs, texts):
        assert o.outputs[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts)) > 6  # sampled, not one forced string
    # the same seeds without the constraint: a story, not JSON
    free = llm.generate(prompts, [SamplingParams(temperature=1.0, max_tokens=40, seed=s) for s in seeds],
                        use_tqdm=False)
    for o in free:
        with pytest.raises(ValueError):
            json.loads(o.outputs[0].text)


def test_n_sequences_each_follow_their_own_grammar(llm):
    so = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)
    out = llm.generate(PROMPTS[0], _params(so, 7, n=4), use_tqdm=False)[0]
    assert len(out.outputs) == 4
    for c in out.outputs:
        assert c.finish_reason == "stop"
        assert " \n" not in c.text and "\n" not in c.text  # compact: no free whitespace
        jsonschema.validate(json.loads(c.text), PERSON)
    assert len({c.text for c in out.outputs}) > 1


def test_regex_choice_grammar(llm):
    regex = r"[A-Z][a-z]{2,8} (is|was) [0-9]{1,3} years old\."
    choices = ["yes", "no", "it depends"]
    ebnf = 'root ::= "(" item ("," item)? ("," item)? ")"\nitem ::= [a-z] [a-z]? [a-z]? | [0-9] [0-9]?'
    kinds = [StructuredOutputsParams(regex=regex), StructuredOutputsParams(choice=choices),
             StructuredOutputsParams(grammar=ebnf)]
    params = [_params(so, seed, max_tokens=60) for so in kinds for seed in range(3)]
    outs = llm.generate([PROMPTS[1]] * len(params), params, use_tqdm=False)
    got = [o.outputs[0] for o in outs]
    assert all(c.finish_reason == "stop" for c in got), [(i, c.text) for i, c in enumerate(got) if c.finish_reason != "stop"]
    for c in got[0:3]:
        assert re.fullmatch(regex, c.text), c.text
    for c in got[3:6]:
        assert c.text in choices
    for c in got[6:9]:
        assert re.fullmatch(r"\((?:[a-z]{1,3}|[0-9]{1,2})(?:,(?:[a-z]{1,3}|[0-9]{1,2})){0,2}\)", c.text), c.text


def test_json_object_with_a_bias(llm):
    """Any JSON object. A story model writes its story inside a string for ever (nothing bounds a string), so a
    logit_bias of +100 (decisive) on the quote and the closing brace makes it close them at once: the bias applies
    after the grammar's mask, which still decides what may come (the first token is "{" or whitespace, never the
    favoured quote; a brace only where an object may close)."""
    tok = llm.get_tokenizer()
    bias = {tok.encode(ch, add_special_tokens=False)[0]: 100.0 for ch in ('"', "}")}
    outs = llm.generate([PROMPTS[3]] * 6, [_params(StructuredOutputsParams(json_object=True), s, max_tokens=96,
                                                   logit_bias=bias) for s in range(6)], use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text
        assert isinstance(json.loads(c.text), dict)


def test_max_tokens_inside_the_grammar_is_length(llm):
    out = llm.generate(PROMPTS[0], _params(StructuredOutputsParams(json=PERSON), 1, max_tokens=6),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6
    assert out.text.lstrip().startswith("{")
    with pytest.raises(ValueError):
        json.loads(out.text)


def test_ignore_eos_still_stops_when_the_grammar_completes(llm):
    out = llm.generate(PROMPTS[2], _params(StructuredOutputsParams(choice=["alpha", "beta"]), 2, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.text in ("alpha", "beta")


def test_async_scheduling_equals_synchronous(llm):
    """Async scheduling fills step k+1's mask after step k's tokens reach the matchers, while step k+1's forward
    runs: the same seeded tokens as stepping synchronously."""
    so = StructuredOutputsParams(json=PERSON)
    params = [_params(so, s) for s in range(4)]
    before = dict(llm.llm_engine.step_stats)
    fast = llm.generate(PROMPTS, params, use_tqdm=False)
    stats = llm.llm_engine.step_stats
    assert stats["queued_ahead"] > before["queued_ahead"] and stats["mask_steps"] > before["mask_steps"]
    slow = LLM(device="cpu", max_model_len=384, async_scheduling=False)
    outs = slow.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in fast]
    assert slow.llm_engine.step_stats["queued_ahead"] == 0


def test_preemption_keeps_the_matchers():
    """A KV cache too small for every sequence preempts some (their KV recomputed later): their matchers keep
    their place (recompute never re-samples an accepted token) and every output still validates."""
    llm = LLM(device="cpu", max_model_len=256, async_scheduling=True, block_size=8, kv_cache_tokens=256)
    so = StructuredOutputsParams(json=PERSON)
    outs = llm.generate(PROMPTS, [_params(so, s) for s in range(4)], use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions_total > 0
    for o in outs:
        assert o.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(o.outputs[0].text), PERSON)


def test_bad_constraints_are_value_errors_naming_the_problem(llm):
    engine = llm.llm_engine
    bad = [
        (StructuredOutputsParams(json={"type": "strin"}), r"structured_outputs\.json: invalid JSON schema"),
        (StructuredOutputsParams(json="{not json"), r"structured_outputs\.json: not valid JSON"),
        (StructuredOutputsParams(regex="(ab"), r"structured_outputs\.regex: invalid or unsupported regex.*parenthesis"),
        (StructuredOutputsParams(grammar='root ::= foo'), r"structured_outputs\.grammar: .*foo"),
    ]
    for so, msg in bad:
        with pytest.raises(ValueError, match=msg):
            engine.add_request("bad", PROMPTS[0], _params(so, 0))
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="unknown field"):
        SamplingParams(structured_outputs={"jsn": {}})
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs.regex == "a+"


def test_compiled_grammars_are_cached(llm):
    compiler = llm.llm_engine.input_processor.structured.compiler
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}
    first = compiler.compile(StructuredOutputsParams(json=schema))
    hits = compiler.stats["hits"]
    # the same schema as text with other spacing: the same key, no second compilation
    again = compiler.compile(StructuredOutputsParams(json=json.dumps(schema, indent=4)))
    assert again is first and compiler.stats["hits"] == hits + 1
    other = compiler.compile(StructuredOutputsParams(json=schema, disable_any_whitespace=True))
    assert other is not first
    saved = compiler.cache_size
    try:
        compiler.cache_size = 2
        for i in range(3):
            compiler.compile(StructuredOutputsParams(regex=f"x{{{i + 1}}}"))
        assert compiler.cache_info()["size"] == 2
    finally:
        compiler.cache_size = saved


def test_bitmask_kernel_matches_reference_with_padded_vocab():
    g = torch.Generator().manual_seed(0)
    for v in (4096, 4000, 33):  # a multiple of 32, a padded vocabulary, a tiny one
        logits = torch.randn(5, v, generator=g)
        mask = torch.randint(-(2**31), 2**31 - 1, (5, (v + 31) // 32), generator=g, dtype=torch.int64).to(torch.int32)
        mask[0] = -1  # an unconstrained row
        ref = apply_token_bitmask_ref(logits.clone(), mask)
        got = apply_token_bitmask(logits.clone(), mask)
        assert torch.equal(torch.isneginf(ref), torch.isneginf(got))
        assert torch.equal(ref[torch.isfinite(ref)], got[torch.isfinite(got)])
        assert torch.isfinite(ref[0]).all()
        bit = (mask[1, 0] >> 3) & 1
        assert bool(torch.isfinite(ref[1, 3])) == bool(bit)
    with pytest.raises(ValueError, match="does not cover"):
        apply_token_bitmask(torch.zeros(2, 100), torch.zeros(2, 3, dtype=torch.int32))


def test_sampler_samples_only_allowed_tokens():
    b, v = 4, 256
    logits = torch.randn(b, v)
    allowed = torch.zeros(b, v, dtype=torch.bool)
    allowed[:, [3, 77, 200]] = True
    allowed[0] = True  # an unconstrained row
    bits = allowed.reshape(b, -1, 32).to(torch.int64) << torch.arange(32)
    mask = bits.sum(-1).to(torch.int64)
    mask = torch.where(mask >= 2**31, mask - 2**32, mask).to(torch.int32)
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(b)]
    for _ in range(20):
        batch = SamplingBatch.from_params(params, [[]] * b, [[]] * b)
        out = Sampler()(logits.clone(), batch, mask)
        for i, t in enumerate(out.token_ids.tolist()):
            assert allowed[i, t]


def test_structural_tag_and_lark_grammars_compile(llm):
    """The other two forms: xgrammar's structural tag (free text with a JSON segment between tags: tool calls)
    and a Lark grammar (vLLM's guided_grammar accepts either EBNF or Lark)."""
    manager = llm.llm_engine.input_processor.structured
    tag = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<tool>"], "tags": [
        {"begin": "<tool>", "content": {"type": "json_schema", "json_schema": {
            "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}, "end": "</tool>"}]}}
    state = manager.states(StructuredOutputsParams(structural_tag=tag), 1)[0]
    assert state.matcher.accept_string('Sure. <tool>{"a": 1}</tool>')
    bad = manager.states(StructuredOutputsParams(structural_tag=tag), 1)[0]
    assert not bad.matcher.accept_string('<tool>{"a": "x"}')
    lark = manager.states(StructuredOutputsParams(grammar='start: "a" NUM\nNUM: /[0-9]+/'), 1)[0]
    assert lark.matcher.accept_string("a12") and not lark.matcher.accept_string("b")


def test_padded_vocabulary_ids_are_never_allowed(llm):
    """The model's vocabulary may be wider than the tokenizer's (DeepSeek: 100015 tokens, 102400 logits): the mask
    covers the logits' width and forbids the ids no token stands for, even where a grammar allows nearly all."""
    from minke.engine.structured_output import StructuredOutputManager

    tok = llm.get_tokenizer()
    width = tok.vocab_size + 100
    manager = StructuredOutputManager(tok, width, [tok.eos_token_id], torch.device("cpu"), 4)
    state = manager.states(StructuredOutputsParams(json={"type": "string"}), 1)[0]
    assert state.matcher.accept_string('"inside a string')
    mask = manager.fill_bitmask([state, None])
    assert mask.shape == (2, (width + 31) // 32)
    logits = torch.zeros(2, width)
    apply_token_bitmask(logits, mask)
    allowed = torch.isfinite(logits[0])
    assert allowed[: tok.vocab_size].sum() > tok.vocab_size // 2  # a string takes most tokens
    assert not allowed[tok.vocab_size:].any()
    assert torch.isfinite(logits[1]).all()  # the unconstrained row


def _greedy_constrained(llm_, n_prompts=3):
    so = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)
    p = SamplingParams(temperature=0.0, max_tokens=96, structured_outputs=so)
    return [o.outputs[0] for o in llm_.generate(PROMPTS[:n_prompts], p, use_tqdm=False)]


def test_tensor_parallel_rank0_masks():
    """Tensor parallelism (2 ranks, gloo): rank 0 fills and applies the masks and samples; rank 1 gets the tokens
    with the next step's inputs (async scheduling: on the device). Greedy constrained tokens equal one process's
    (float32: in bf16 the ranks' partial sums round differently enough to flip near-tied junk tokens)."""
    import torch.distributed as dist

    want = _greedy_constrained(LLM(device="cpu", dtype="float32", max_model_len=384))
    tp = LLM(device="cpu", dtype="float32", max_model_len=384, tensor_parallel_size=2, async_scheduling=True)
    try:
        got = _greedy_constrained(tp)
        assert tp.llm_engine.step_stats["mask_steps"] > 0 and tp.llm_engine.step_stats["queued_ahead"] > 0
    finally:
        tp.llm_engine.runner.shutdown()
    assert not dist.is_initialized()
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    for c in got:
        jsonschema.validate(json.loads(c.text), PERSON)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graphs_and_async_scheduling_with_masks():
    """On a GPU: decode steps replay CUDA graphs (the mask is applied after the replay, on its logits) with async
    scheduling (each mask filled while the forward runs); seeded samples at temperature 1 equal eager synchronous
    stepping's, and every output validates."""
    so = StructuredOutputsParams(json=PERSON)
    params = [_params(so, s) for s in range(8)]
    prompts = [PROMPTS[s % len(PROMPTS)] for s in range(8)]
    # a fixed KV capacity: both engines live in this process, and a default-sized first one would leave the
    # second no memory (KV cache of 0 tokens)
    fast = LLM(device="cuda", dtype="float32", max_model_len=384, kv_cache_tokens=16384)
    assert fast.llm_engine.runner.graphs is not None and fast.llm_engine.async_scheduling
    a = fast.generate(prompts, params, use_tqdm=False)
    st = fast.llm_engine.step_stats
    assert st["mask_steps"] > 0
    print(f"mask ready before the GPU finished: {st['mask_ready_early']} of {st['mask_steps']} steps")
    slow = LLM(device="cuda", dtype="float32", max_model_len=384, kv_cache_tokens=16384, enforce_eager=True,
               async_scheduling=False)
    b = slow.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    for o in a:
        assert o.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(o.outputs[0].text), PERSON)
