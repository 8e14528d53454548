"""Process hygiene for the engine core and the API-server processes: no process outlives the one that started it."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: the kernel sends `sig` to this process when its parent dies (prctl PR_SET_PDEATHSIG), however the
    parent died (SIGKILL included). Elsewhere, and as a second net, parent_watchdog does it by polling."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def parent_watchdog(parent_pid: int, interval: float = 1.0) -> threading.Thread:
    """A daemon thread that kills this process once `parent_pid` is no longer its parent (the parent died and
    the process was re-parented), in case PDEATHSIG was not available or raced with the parent's death."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(interval)

    t = threading.Thread(target=watch, name="minke-parent-watchdog", daemon=True)
    t.start()
    return t


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped by its parent, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
