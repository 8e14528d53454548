"""Checkpoints as transformers' Trainer lays them out, so a run resumes from the newest one automatically, and
every write is safe to interrupt.

output_dir/
  checkpoint-N/            every save_steps (or epoch); the oldest removed past save_total_limit
    model files            full runs: an HF-format model (fp32 master weights); LoRA runs: the PEFT adapter
    optimizer.pt           full optimizer state keyed by parameter name (loads under any number of processes)
    scheduler.pt  rng_state_R.pth (one per rank)  [scaler.pt with --fp16]
    manifest.json          every file's size; trainer_state.json (written last: its presence marks it whole)
  <final model or adapter>, trainer_log.jsonl, runs/ (tensorboard), completed (marker: the run finished)

Writes: a checkpoint goes to checkpoint-N.tmp, every file is fsynced (mode 0644 under the umask, not the 0600
safetensors writes), then the directory is renamed. The final model goes to .final.tmp/ and its files are renamed
into output_dir one by one, config last, then `completed`. A run killed at any point leaves either a whole
checkpoint or a leftover that the next run removes (saying so). A checkpoint that is complete but damaged (a file
truncated, missing or unreadable) is skipped for the previous good one, with a message. Failures to write (a full
disk, no permission) are one-line errors naming the directory and the free space.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable

import torch

from .distributed import DistInfo

PREFIX = "checkpoint"
COMPLETED = "completed"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
FINAL_TMP = ".final.tmp"
LOG_FILE = "trainer_log.jsonl"
# What a final output holds (a model or an adapter): removed when it is stale, never anything else.
FINAL_FILES = re.compile(r"(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
                         r"model\.safetensors\.index\.json|adapter_config\.json|adapter_model\.safetensors|"
                         r"tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|chat_template\.jinja|"
                         r"README\.md)")


class OutputError(ValueError):
    """The output directory cannot be written (permission, full disk): a one-line error, no traceback."""


# ---- low-level safe writes ------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def gb(n: float) -> str:
    """A byte count for people: 1.23 GB, 45.6 MB, 789 KB."""
    for unit, size in (("GB", 1024**3), ("MB", 1024**2)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{n / 1024:.0f} KB"


def free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal_dir(path: str) -> None:
    """Give every file under `path` the mode a plain open() would (0666 & ~umask; safetensors writes 0600) and
    fsync files and directories, so a rename afterwards publishes complete bytes."""
    mode = 0o666 & ~_umask()
    for root, _, files in os.walk(path):
        for name in files:
            f = os.path.join(root, name)
            os.chmod(f, mode)
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def write_file_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def io_error(what: str, where: str, e: OSError) -> OutputError:
    free = ""
    try:
        free = f"; {gb(free_bytes(where if os.path.isdir(where) else os.path.dirname(where) or '.'))} free there"
    except OSError:
        pass
    reason = e.strerror or str(e)
    return OutputError(f"could not write {what} to {where}: {reason}{free}")


# ---- the output directory -------------------------------------------------------------------------------------


def check_output_dir(output_dir: str, log) -> int:
    """Create output_dir and prove it writable (a probe file written, fsynced, removed) before anything heavy is
    loaded. Logs and returns the free bytes."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise io_error("the output directory", output_dir, e) from None
    if not os.path.isdir(output_dir):
        raise OutputError(f"--output_dir {output_dir} is not a directory")
    probe = os.path.join(output_dir, f".minke-write-test-{os.getpid()}")
    try:
        write_file_atomic(probe, b"ok")
        os.remove(probe)
    except OSError as e:
        for f in (probe, probe + ".tmp"):
            if os.path.exists(f):
                os.remove(f)
        raise io_error("files", output_dir, e) from None
    free = free_bytes(output_dir)
    log(f"output: {os.path.abspath(output_dir)} ({gb(free)} free)")
    return free


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(rf"{PREFIX}-(\d+)", name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def final_files(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    return sorted(f for f in os.listdir(output_dir)
                  if FINAL_FILES.fullmatch(f) and os.path.isfile(os.path.join(output_dir, f)))


def _is_run_dir(output_dir: str) -> bool:
    """Something minke's training wrote is there (so its model files are ours to replace)."""
    names = os.listdir(output_dir)
    return any(n in (COMPLETED, LOG_FILE, FINAL_TMP) or n.startswith(f"{PREFIX}-") for n in names)


def leftovers(output_dir: str) -> list[str]:
    """Partial writes of an interrupted run: checkpoint-N.tmp, .final.tmp, *.tmp files."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir)
                  if n.endswith(".tmp") or n.startswith((".tmp", ".minke-write-test-")))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def prepare_output_dir(output_dir: str, overwrite: bool, resume: str | None, log, apply: bool = True) -> None:
    """Before training: remove leftovers of interrupted writes; with --overwrite_output_dir (and nothing to resume)
    the previous run's checkpoints, final model and marker; without it a final model that no `completed` marker
    vouches for (a final save that was interrupted). Every removal is logged. Every rank calls it (so all raise the
    same error); only the one with `apply` removes anything."""
    finals = final_files(output_dir)
    if finals and not overwrite and not os.path.exists(os.path.join(output_dir, COMPLETED)) \
            and not _is_run_dir(output_dir):
        raise OutputError(f"--output_dir {output_dir} already holds model files ({', '.join(finals[:4])}) that "
                          "no minke run wrote; choose another --output_dir, or pass --overwrite_output_dir "
                          "True to replace them")
    if not apply:
        return
    junk = leftovers(output_dir)
    if junk:
        log(f"output: removing {len(junk)} leftover(s) of an interrupted write: {', '.join(junk)}")
        for n in junk:
            _remove(os.path.join(output_dir, n))
    ckpts, finals = list_checkpoints(output_dir), final_files(output_dir)
    completed = os.path.exists(os.path.join(output_dir, COMPLETED))
    if overwrite and not resume:
        if ckpts or finals or completed:
            what = []
            if ckpts:
                what.append(f"{len(ckpts)} checkpoint(s) (newest {os.path.basename(ckpts[-1][1])})")
            if finals:
                what.append(f"the final {'model' if 'config.json' in finals else 'output'} ({len(finals)} files)")
            if completed:
                what.append("the 'completed' marker")
            log(f"--overwrite_output_dir: removing the previous run's {', '.join(what)} from {output_dir}; "
                "training from step 0 (drop --overwrite_output_dir to resume from the newest checkpoint instead)")
        for _, path in ckpts:
            _remove(path)
        for f in finals + ([COMPLETED] if completed else []):
            _remove(os.path.join(output_dir, f))
        return
    if finals and not completed:
        log(f"output: removing an unfinished final output ({', '.join(finals)}): the run was interrupted while "
            "saving it; it is written again at the end")
        for f in finals:
            _remove(os.path.join(output_dir, f))


def rotate(output_dir: str, limit: int | None) -> None:
    if not limit:
        return
    for _, path in list_checkpoints(output_dir)[:-limit]:
        shutil.rmtree(path, ignore_errors=True)


# ---- checking a checkpoint ------------------------------------------------------------------------------------


def _check_safetensors(path: str) -> None:
    """Header parses and the data it describes fits in the file (cheap: reads the header only)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("truncated safetensors header")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise ValueError("bad safetensors header length")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"holds {size} bytes, its header describes {8 + n + end}")


def validate_checkpoint(path: str) -> None:
    """Raise ValueError naming what is wrong with a checkpoint directory: its state file, a file the manifest lists
    missing or of another size, a safetensors header, a torch file's archive (opened with mmap: no full read)."""
    state_file = os.path.join(path, STATE_FILE)
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{STATE_FILE} unreadable ({type(e).__name__}: {e})") from None
    manifest_file = os.path.join(path, MANIFEST)
    if os.path.isfile(manifest_file):
        try:
            with open(manifest_file, encoding="utf-8") as f:
                sizes = json.load(f)["files"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{MANIFEST} unreadable ({e})") from None
        for name, size in sizes.items():
            fp = os.path.join(path, name)
            if not os.path.isfile(fp):
                raise ValueError(f"{name} is missing")
            if os.path.getsize(fp) != size:
                raise ValueError(f"{name} holds {os.path.getsize(fp)} bytes, {size} were written")
    for name in sorted(os.listdir(path)):
        fp = os.path.join(path, name)
        try:
            if name.endswith(".safetensors"):
                _check_safetensors(fp)
            elif name.endswith((".pt", ".pth")):
                torch.load(fp, map_location="cpu", weights_only=False, mmap=True)
            elif name.endswith(".json"):
                with open(fp, encoding="utf-8") as f:
                    json.load(f)
        except Exception as e:  # any decoding failure means the same thing: this file is damaged
            raise ValueError(f"{name} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not os.path.isfile(os.path.join(path, "optimizer.pt")):
        raise ValueError("optimizer.pt is missing")


def find_resume(output_dir: str, explicit: str | None, overwrite: bool, log) -> str | None:
    """The checkpoint to resume from: --resume_from_checkpoint (it must be sound), else the newest sound one in
    output_dir (finetune.py's get_last_checkpoint), skipping damaged ones with a message. A finished run is not
    silently retrained; --overwrite_output_dir starts afresh."""
    if explicit:
        if not os.path.isfile(os.path.join(explicit, STATE_FILE)):
            raise FileNotFoundError(f"--resume_from_checkpoint {explicit}: not a checkpoint (no {STATE_FILE})")
        try:
            validate_checkpoint(explicit)
        except ValueError as e:
            raise ValueError(f"--resume_from_checkpoint {explicit} is damaged: {e}") from None
        return explicit
    if overwrite:
        return None
    if os.path.exists(os.path.join(output_dir, COMPLETED)):
        raise ValueError(f"{output_dir} holds a completed run; pass --overwrite_output_dir True to train again, "
                         "or choose another --output_dir")
    damaged = []
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            validate_checkpoint(path)
        except ValueError as e:
            damaged.append(os.path.basename(path))
            log(f"warning: {path} is damaged ({e}); skipping it")
            continue
        if damaged:
            log(f"resuming from the previous good checkpoint {os.path.basename(path)} instead of "
                f"{', '.join(damaged)}")
        return path
    if damaged:
        log(f"warning: no sound checkpoint in {output_dir} ({', '.join(damaged)} damaged); training from step 0")
    return None


# ---- saving and loading ---------------------------------------------------------------------------------------


def rng_state() -> dict:
    st = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["cpu"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _manifest(path: str) -> bytes:
    sizes = {n: os.path.getsize(os.path.join(path, n)) for n in sorted(os.listdir(path))
             if os.path.isfile(os.path.join(path, n)) and n not in (MANIFEST, STATE_FILE)}
    return json.dumps({"files": sizes}, indent=2).encode()


def save_checkpoint(output_dir: str, step: int, info: DistInfo, write_model: Callable[[str], None],
                    optimizer_state: dict, scheduler_state: dict, trainer_state: dict, limit: int | None,
                    extra: dict[str, object] | None = None) -> str:
    """Collective: every rank calls it (each writes its RNG state); rank 0 writes the rest. `write_model(dir)` runs
    on rank 0 with the gathered weights. `extra`: more torch files (name -> object), e.g. the fp16 loss scaler."""
    final = os.path.join(output_dir, f"{PREFIX}-{step}")
    tmp = final + ".tmp"
    error = None
    try:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
    except OSError as e:
        error = e
    if any_failed(error, info):  # every rank learns of a failure, so none waits forever at a barrier
        raise _save_error(step, output_dir, error, tmp, info)
    try:
        torch.save(rng_state(), os.path.join(tmp, f"rng_state_{info.rank}.pth"))
        if info.is_main:
            write_model(tmp)
            torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
            torch.save(scheduler_state, os.path.join(tmp, "scheduler.pt"))
            for name, obj in (extra or {}).items():
                torch.save(obj, os.path.join(tmp, name))
    except OSError as e:
        error = e
    if any_failed(error, info):
        raise _save_error(step, output_dir, error, tmp, info)
    try:
        if info.is_main:
            with open(os.path.join(tmp, MANIFEST), "wb") as f:
                f.write(_manifest(tmp))
            with open(os.path.join(tmp, STATE_FILE), "w") as f:  # last: its presence marks the checkpoint whole
                json.dump(trainer_state, f, indent=2)
            seal_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(output_dir)
            rotate(output_dir, limit)
    except OSError as e:
        error = e
    if any_failed(error, info):
        raise _save_error(step, output_dir, error, tmp, info)
    return final


def any_failed(error: BaseException | None, info: DistInfo) -> bool:
    """Collective: did any rank fail? (One process: whether this one did.)"""
    if not info.enabled:
        return error is not None
    import torch.distributed as dist

    flag = torch.tensor([0.0 if error is None else 1.0], device=info.device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return flag.item() > 0


def _save_error(step: int, output_dir: str, error: OSError | None, tmp: str, info: DistInfo) -> OutputError:
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is None:
        return OutputError(f"could not write checkpoint-{step} to {output_dir}: another process failed to write "
                           "its part (see its message)")
    return io_error(f"checkpoint-{step}", output_dir, error)


def save_final(output_dir: str, write: Callable[[str], None]) -> None:
    """Rank 0: the final model/adapter, written whole to .final.tmp/, sealed, then renamed file by file into
    output_dir (config.json last), then the `completed` marker."""
    tmp = os.path.join(output_dir, FINAL_TMP)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        write(tmp)
        seal_dir(tmp)
        new = sorted(os.listdir(tmp), key=lambda n: (n in ("config.json", "adapter_config.json"), n))
        for stale in set(final_files(output_dir)) - set(new):  # e.g. shards of a larger earlier output
            os.remove(os.path.join(output_dir, stale))
        for name in new:
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
        os.rmdir(tmp)
        _fsync_dir(output_dir)
        write_file_atomic(os.path.join(output_dir, COMPLETED), b"")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise io_error("the final model", output_dir, e) from None


def load_checkpoint(path: str, info: DistInfo) -> dict:
    """trainer_state, optimizer, scheduler, extras and this rank's RNG state (rank 0's when the world size
    changed)."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    rng_file = os.path.join(path, f"rng_state_{info.rank}.pth")
    if not os.path.isfile(rng_file):
        rng_file = os.path.join(path, "rng_state_0.pth")
    scaler = os.path.join(path, "scaler.pt")
    return {
        "trainer_state": state,
        "optimizer": torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=False),
        "scheduler": torch.load(os.path.join(path, "scheduler.pt"), map_location="cpu", weights_only=False),
        "rng": torch.load(rng_file, map_location="cpu", weights_only=False),
        "scaler": torch.load(scaler, map_location="cpu", weights_only=False) if os.path.isfile(scaler) else None,
    }


def mark_completed(output_dir: str) -> None:
    write_file_atomic(os.path.join(output_dir, COMPLETED), b"")
