"""`minke finetune` under faults: runs killed with SIGKILL resume bit-exact (full, LoRA, bf16), half-written and
damaged checkpoints are skipped with a message, an unwritable or full output directory is a one-line error before
any work is lost, --overwrite_output_dir says what it removes and leaves no stale final model, interrupted final
saves are repaired, files are 0644, and the log has each step once."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from minke.cli import main
from minke.train import checkpoint as ckpt
from tiny_models import make_sft_assets

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QA = [("What is the capital of France?", "Paris is the capital of France."),
      ("Name a primary color.", "Red is a primary color."),
      ("How many legs does a cat have?", "A cat has four legs."),
      ("What do bees make?", "Bees make honey."),
      ("What is two plus two?", "Two plus two is four."),
      ("Which planet is red?", "Mars is the red planet.")]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    return make_sft_assets(d, QA)


def _args(assets, out, *extra):
    base, data = assets
    return ["finetune", "--model_name_or_path", base, "--data_path", data, "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--disable_tqdm", "True", "--seed", "0",
            "--learning_rate", "3e-3", "--use_cpu", "True", *extra]  # CPU: bit-exact by construction


def _log_steps(out) -> list[int]:
    with open(os.path.join(out, "trainer_log.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def _weights(out) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if os.path.isfile(os.path.join(out, "adapter_model.safetensors")) \
        else "model.safetensors"
    return load_file(os.path.join(out, name))


def _assert_bit_exact(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]), k


def _subprocess(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-m", "minke.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---- killed runs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "lora", "bf16"])
def test_sigkilled_run_resumes_bit_exact(mode, assets, tmp_path):
    """A run SIGKILLed after its second checkpoint (possibly while writing the next) and started again ends with
    exactly the weights of a run that was never interrupted, and logs each step once."""
    extra = ["--max_steps", "24", "--save_steps", "2", "--save_total_limit", "2", "--lr_scheduler_type", "cosine",
             "--warmup_steps", "3", "--gradient_accumulation_steps", "2"]
    extra += {"full": [], "lora": ["--use_lora", "True", "--lora_dropout", "0.2"], "bf16": ["--bf16", "True"]}[mode]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(_args(assets, ref, *extra)) == 0  # the uninterrupted reference (one thread as well)
    p = _subprocess(_args(assets, out, *extra))
    deadline = time.time() + 300
    while not os.path.isfile(out / "checkpoint-4" / ckpt.STATE_FILE) and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(out / "completed")

    p = _subprocess(_args(assets, out, *extra))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    resumed = [line for line in err.splitlines() if line.startswith("resumed from")]
    assert resumed and int(resumed[0].rsplit("at step ", 1)[1]) >= 4, err
    _assert_bit_exact(ref, out)
    assert _log_steps(out) == list(range(1, 25)), "each step once: the resumed run cut the log back"
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_half_written_checkpoints_and_leftovers_are_skipped(assets, tmp_path):
    out = tmp_path / "out"
    args = _args(assets, out, "--max_steps", "6", "--save_steps", "2")
    assert main(args) == 0
    reference = _weights(out)
    # As if killed: the final output half-moved, checkpoint-6 half-written, stray temp files.
    os.remove(out / "completed")
    os.remove(out / "config.json")
    os.makedirs(out / "checkpoint-6.tmp")
    (out / "checkpoint-6.tmp" / "optimizer.pt").write_bytes(b"\0" * 10)
    os.makedirs(out / "checkpoint-8")  # no trainer_state.json: never finished
    (out / "trainer_log.jsonl.tmp").write_text("{")
    os.makedirs(out / ckpt.FINAL_TMP)
    assert ckpt.list_checkpoints(str(out))[-1][0] == 4
    assert main(args) == 0
    assert not os.path.exists(out / "checkpoint-6.tmp") and not os.path.exists(out / ckpt.FINAL_TMP)
    assert not os.path.exists(out / "trainer_log.jsonl.tmp")
    assert os.path.exists(out / "completed") and os.path.getsize(out / "config.json") > 0
    new = _weights(out)
    assert all(torch.equal(reference[k], new[k]) for k in reference)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_checkpoint_falls_back_to_the_previous_good_one(damage, assets, tmp_path, capsys):
    out = tmp_path / "out"
    args = _args(assets, out, "--max_steps", "6", "--save_steps", "2")
    assert main(args) == 0
    reference = _weights(out)
    os.remove(out / "completed")
    victim = out / "checkpoint-4" / "optimizer.pt"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    elif damage == "garbage":
        victim.write_bytes(b"x" * victim.stat().st_size)  # same size: the manifest cannot tell, the archive can
    else:
        os.remove(out / "checkpoint-4" / "model.safetensors")
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "checkpoint-4 is damaged" in err and "previous good checkpoint checkpoint-2" in err, err
    assert "resumed from" in err and "checkpoint-2 at step 2" in err
    new = _weights(out)
    assert all(torch.equal(reference[k], new[k]) for k in reference), "resumed from checkpoint-2, same result"
    assert _log_steps(out) == [1, 2, 3, 4, 5, 6]


def test_an_explicitly_named_damaged_checkpoint_is_an_error(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(assets, out, "--max_steps", "2", "--save_steps", "1")) == 0
    (out / "checkpoint-1" / ckpt.STATE_FILE).write_text("{not json")
    assert main(_args(assets, tmp_path / "o2", "--max_steps", "2",
                      "--resume_from_checkpoint", str(out / "checkpoint-1"))) == 1
    err = capsys.readouterr().err
    assert "is damaged" in err and "trainer_state.json" in err and "Traceback" not in err


# ---- the output directory ------------------------------------------------------------------------------------


def _no_setup(monkeypatch):
    """Fail the test if the model or data is loaded: the output checks come first."""
    import minke.commands.finetune as cmd

    def boom(*a, **k):
        raise AssertionError("the model/data were loaded before the output directory was checked")

    monkeypatch.setattr("minke.train.data.load_sft_dataset", boom)
    monkeypatch.setattr("minke.train.finetune.build_finetune_model", boom)
    return cmd


def test_unwritable_output_dir_is_one_line_before_loading(assets, tmp_path, capsys, monkeypatch):
    _no_setup(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(_args(assets, blocker / "out", "--max_steps", "1")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("minke finetune: error: could not write the output directory") and "\n" not in err, err

    def denied(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(ckpt, "write_file_atomic", denied)
    assert main(_args(assets, tmp_path / "out", "--max_steps", "1")) == 1
    err = capsys.readouterr().err.strip()
    assert "could not write files to" in err and "Permission denied" in err and "GB free" in err, err
    assert "\n" not in err


def test_too_little_space_for_the_only_save_is_refused_before_training(assets, tmp_path, capsys, monkeypatch):
    import minke.train.trainer as trainer

    def no_training(self):
        raise AssertionError("training started although the final model could not be written")

    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 4096)
    monkeypatch.setattr(trainer.Trainer, "train", no_training)
    assert main(_args(assets, tmp_path / "out", "--max_steps", "5", "--save_strategy", "no")) == 1
    err = capsys.readouterr().err
    assert "has 4 KB free but the final output needs" in err, err


def _enospc_on(monkeypatch, module, name, when):
    real = getattr(module, name)

    def write(*a, **k):
        if when(a, k):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(module, name, write)


def test_full_disk_at_a_checkpoint_is_one_line_and_leaves_the_last_good_one(assets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _enospc_on(monkeypatch, torch, "save", lambda a, k: "checkpoint-4.tmp" in str(a[1]) and "optimizer" in str(a[1]))
    assert main(_args(assets, out, "--max_steps", "6", "--save_steps", "2")) == 1
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("minke finetune: error")][0]
    assert "could not write checkpoint-4" in line and "No space left on device" in line and "free there" in line
    assert "Traceback" not in err
    assert sorted(os.listdir(out)) == ["checkpoint-2", "trainer_log.jsonl"], "no half-written checkpoint-4.tmp"
    ckpt.validate_checkpoint(str(out / "checkpoint-2"))


def test_full_disk_at_the_final_save_leaves_no_complete_looking_model(assets, tmp_path, capsys, monkeypatch):
    import safetensors.torch as st

    out = tmp_path / "out"
    _enospc_on(monkeypatch, st, "save_file", lambda a, k: ckpt.FINAL_TMP in str(a[1]))
    assert main(_args(assets, out, "--max_steps", "4", "--save_steps", "2")) == 1
    err = capsys.readouterr().err
    assert "could not write the final model" in err and "No space left on device" in err
    assert not ckpt.final_files(str(out)) and not os.path.exists(out / "completed")
    assert not os.path.exists(out / ckpt.FINAL_TMP)
    monkeypatch.undo()
    assert main(_args(assets, out, "--max_steps", "4", "--save_steps", "2")) == 0, "the rerun resumes and finishes"
    assert "resumed from" in capsys.readouterr().err and os.path.exists(out / "completed")


def test_interrupted_final_save_is_repaired(assets, tmp_path, capsys, monkeypatch):
    """Killed between renaming the weights and the config into place: no 0-byte config.json beside complete
    weights is ever produced, and the rerun removes the half-published output before resuming."""
    out = tmp_path / "out"
    real = os.replace

    def die_at_config(src, dst):
        if os.path.basename(dst) == "config.json":
            raise KeyboardInterrupt  # stands in for the kill: nothing after this point runs
        return real(src, dst)

    monkeypatch.setattr(os, "replace", die_at_config)
    assert main(_args(assets, out, "--max_steps", "4", "--save_steps", "2")) == 130
    monkeypatch.undo()
    assert os.path.isfile(out / "model.safetensors") and not os.path.exists(out / "config.json")
    assert not os.path.exists(out / "completed")
    capsys.readouterr()
    assert main(_args(assets, out, "--max_steps", "4", "--save_steps", "2")) == 0
    err = capsys.readouterr().err
    assert "removing an unfinished final output" in err and "leftover" in err
    assert os.path.getsize(out / "config.json") > 0 and os.path.exists(out / "completed")


def test_overwrite_output_dir_says_what_it_removes_and_leaves_no_stale_model(assets, tmp_path, capsys, monkeypatch):
    import minke.train.trainer as trainer

    out = tmp_path / "out"
    assert main(_args(assets, out, "--max_steps", "4", "--save_steps", "2")) == 0
    capsys.readouterr()

    def crash(self):
        raise ValueError("simulated crash in the first step")

    monkeypatch.setattr(trainer.Trainer, "train_step", crash)
    assert main(_args(assets, out, "--max_steps", "4", "--save_steps", "2", "--overwrite_output_dir", "True")) == 1
    err = capsys.readouterr().err
    assert "--overwrite_output_dir: removing the previous run's 1 checkpoint(s) (newest checkpoint-2)" in err
    assert "the final model" in err and "'completed' marker" in err and "training from step 0" in err
    assert not ckpt.final_files(str(out)) and not os.path.exists(out / "completed"), \
        "the previous run's final model does not stay behind looking complete"


def test_foreign_model_files_in_output_dir_are_not_deleted(assets, tmp_path, capsys):
    base, _ = assets
    out = tmp_path / "someone_elses_model"
    shutil.copytree(base, out)
    assert main(_args(assets, out, "--max_steps", "1")) == 1
    assert "that no minke run wrote" in capsys.readouterr().err
    assert os.path.isfile(out / "model.safetensors")


def test_outputs_are_0644_under_the_umask(assets, tmp_path):
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert main(_args(assets, out, "--max_steps", "2", "--save_steps", "1")) == 0
    finally:
        os.umask(old)
    for path in (out / "model.safetensors", out / "checkpoint-1" / "model.safetensors",
                 out / "checkpoint-1" / "optimizer.pt", out / "config.json"):
        assert oct(os.stat(path).st_mode & 0o777) == "0o644", path
