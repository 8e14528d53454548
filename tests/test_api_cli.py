"""A new user's first hour with the `minke` command (issue 24, item 4): every default in --help, an unknown flag
answered with the subcommand's usage, sampling values checked before the model loads, a truncated checkpoint in
one line, --max-model-len past the model's context refused, a CPU KV cache sized to the model, chat's /help."""

from __future__ import annotations

import argparse
import io
import os
import shutil

import pytest

import minke.engine.llm as llm_module
from minke import LLM, load_model
from minke.cli import build_parser, main
from minke.default_model import default_model_dir
from minke.loader import CheckpointError


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "bench"])
def test_help_shows_every_default(command):
    p = _subparsers()[command]
    fmt = p._get_formatter()
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in p._actions
               if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
               and a.default != argparse.SUPPRESS  # "same as --x" aliases of a flag listed with its default
               and "default" not in (fmt._expand_help(a) if a.help else "")]
    assert not missing, f"minke {command} --help shows no default for {missing}"
    assert "(default: 0.7)" not in p.format_help()  # sampling defaults name where they come from
    if command in ("generate", "chat"):
        assert "generation_config.json value, else 0.7" in " ".join(p.format_help().split())


def test_unknown_flag_prints_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x", "--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: minke generate" in err and "--max-tokens" in err
    assert "minke generate: error: unrecognized arguments: --no-such-flag" in err


def _no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(llm_module.LLMEngine, "__init__", refuse)


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--max-tokens", "0"], "max_tokens must be >= 1"),
])
def test_generate_and_chat_check_sampling_values_before_loading(monkeypatch, capsys, flags, message):
    _no_model_load(monkeypatch)
    assert main(["generate", "--prompt", "x", "--device", "cpu", *flags]) == 1
    assert f"minke generate: error: {message}" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--device", "cpu", *flags]) == 1
    assert f"minke chat: error: {message}" in capsys.readouterr().err


@pytest.fixture()
def truncated(tmp_path):
    d = tmp_path / "trunc"
    shutil.copytree(default_model_dir(), d)
    w = d / "model.safetensors"
    with open(w, "r+b") as f:
        f.truncate(os.path.getsize(w) // 2)
    return str(d), str(w)


def test_truncated_safetensors_is_one_line_naming_the_file(truncated, capsys):
    d, w = truncated
    with pytest.raises(CheckpointError, match=f"cannot read {w}: .*truncated or damaged"):
        load_model(d)
    assert main(["generate", d, "--prompt", "x", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"minke generate: error: cannot read {w}") and "Traceback" not in "\n".join(err)
    with open(w, "r+b") as f:  # cut inside the header too
        f.truncate(5)
    with pytest.raises(CheckpointError, match=f"cannot read {w}"):
        load_model(d)


def test_max_model_len_past_the_models_context_needs_the_override():
    # the default model's config: max_position_embeddings 1024
    with pytest.raises(ValueError, match="max_model_len 2048 is above the model's context of 1024 tokens .*"
                                         "--allow-long-max-model-len"):
        LLM(device="cpu", kv_cache_tokens=4096, max_model_len=2048)
    llm = LLM(device="cpu", kv_cache_tokens=4096, max_model_len=2048, allow_long_max_model_len=True)
    assert llm.max_model_len == 2048
    args = build_parser().parse_args(["generate", "--max-model-len", "2048", "--allow-long-max-model-len"])
    assert args.allow_long_max_model_len is True


def test_cpu_kv_cache_default_is_sized_to_the_model():
    llm = LLM(device="cpu", max_num_seqs=4, max_model_len=250)
    assert llm.llm_engine.runner.capacity_tokens == 4 * 256  # whole 16-token blocks
    # without max_model_len: max_num_seqs sequences of the config's 1024 positions, far below the 1 GiB default
    llm = LLM(device="cpu", max_num_seqs=2)
    assert llm.llm_engine.runner.capacity_tokens == 2 * 1024 and llm.max_model_len == 1024
    # kv_cache_gib still caps it
    llm = LLM(device="cpu", max_num_seqs=256, kv_cache_gib=1 / 1024)
    per_token = llm.llm_engine.runner.kv_bytes_per_token
    assert llm.llm_engine.runner.capacity_tokens == pytest.approx(2**20 // per_token, abs=16)


def test_chat_help_lists_the_commands_and_reset_confirms(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("/help\n/reset\n/nope\n/exit\n"))
    assert main(["chat", "--device", "cpu", "--kv-cache-tokens", "256", "--system", "Be brief."]) == 0
    err = capsys.readouterr().err
    for command in ("/help", "/reset", "/exit", "Ctrl-D", "Ctrl-C"):
        assert command in err
    assert "[conversation reset: the system prompt is kept]" in err
    assert "[unknown command /nope; /help lists the commands]" in err
