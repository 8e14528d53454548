"""The SASS of a compiled Triton kernel without a GPU, for the compile reports (gemv, MLA decode, paged attention):
Triton's bundled cuobjdump disassembles the cubin, and every backward branch marks a loop whose body is the
instructions a warp issues per pass."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_ADDR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/")


def cuobjdump(cubin: bytes, flag: str) -> str:
    """`cuobjdump <flag>` of the cubin (-sass, -res-usage)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([os.path.join(BIN, "cuobjdump"), flag, path], capture_output=True, text=True).stdout


def sass_loops(sass: str) -> list[list[str]]:
    """The body of every backward branch in cuobjdump -sass output, as its instruction lines, in program order."""
    lines = [ln for ln in sass.splitlines() if _ADDR.match(ln)]
    addr = [int(_ADDR.match(ln).group(1), 16) for ln in lines]
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+0x([0-9a-f]+)", line)
        if m and int(m.group(1), 16) < addr[i]:
            loops.append([ln for a, ln in zip(addr, lines) if int(m.group(1), 16) <= a <= addr[i]])
    return loops


def opcode(line: str) -> str:
    """The opcode of a SASS line without its predicate and modifiers ('@!P1 IMAD.IADD R1, ...' -> 'IMAD')."""
    m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
    return m.group(1) if m else ""
