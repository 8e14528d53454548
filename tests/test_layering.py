"""minke's layering: a module may import its own layer and the layers below it, never a higher one.

Every module under minke/ is parsed (ast, nothing is imported), and every import of minke counts: `from ..x import`,
`from minke.x import`, `import minke.x`, `from .. import x`, importlib.import_module("minke.x..."), at module level,
inside functions and under `if TYPE_CHECKING:` alike (a type-only import is still a dependency of the design).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MINKE = Path(__file__).resolve().parent.parent / "minke"

# Low to high: each top-level module / package of minke and its layer. Kernels are leaves (they import nothing of
# minke outside kernels/). Modules that import nothing of minke, or only the first two layers, sit as low as their
# own imports allow, so that whatever needs them may import them: config, weights, logging_utils, tokenizer,
# sampling_params, default_model, version (a leaf, but kernels import nothing outside kernels/, so it sits one layer
# up); loader builds models, so it shares their layer. "__init__" is the package root
# (`from minke import LLM, __version__`): the public facade, on top.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("kernels",)),
    ("models", ("models", "config", "weights", "loader", "logging_utils", "tokenizer", "sampling_params",
                "default_model", "version")),
    ("parallel", ("parallel",)),
    # adapters: module swaps applied to a built (sharded) model from outside it; the runner applies them
    ("lora", ("lora",)),
    ("runner", ("runner",)),
    ("engine", ("engine",)),
    # minke eval: runs on the engine (or over HTTP), never on the server's internals; commands import it.
    ("eval", ("eval",)),
    ("top", ("server", "commands", "train", "benchmark", "cli", "__init__")),
]

# (importing file relative to minke/, imported top-level name): true exceptions only, each justified in a comment.
ALLOWED: set[tuple[str, str]] = set()

LAYER_OF = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def _top_level_names() -> set[str]:
    """minke's top-level modules and packages (a package may be a namespace package, without __init__.py)."""
    names = {"__init__"}
    for p in MINKE.iterdir():
        if p.suffix == ".py" and p.stem != "__init__":
            names.add(p.stem)
        elif p.is_dir() and any(p.rglob("*.py")):
            names.add(p.name)
    return names


def _modules() -> list[Path]:
    return sorted(MINKE.rglob("*.py"))


def _owner(path: Path) -> str:
    """The top-level name a file belongs to: minke/engine/llm.py -> engine, minke/config.py -> config."""
    parts = path.relative_to(MINKE).parts
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def _minke_target(dotted: str, names: set[str]) -> str | None:
    """'minke.engine.llm' -> 'engine'; 'minke' (the root package) -> '__init__'; not minke -> None."""
    parts = dotted.split(".")
    if parts[0] != "minke":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in names else "__init__"


def imports_of(path: Path, names: set[str], root: Path = MINKE) -> list[tuple[int, str]]:
    """(line, imported top-level name) for every import of minke in the file at path, under the package root."""
    rel = path.relative_to(root.parent).with_suffix("").parts  # ('minke', 'engine', 'llm')
    package = rel[:-1]  # the package a relative import starts from (for __init__.py: its own package)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level > len(package):
                    raise AssertionError(f"{path}:{node.lineno}: relative import goes above the minke package")
                base = ".".join(package[: len(package) - node.level + 1])
                dotted = f"{base}.{node.module}" if node.module else base
            else:
                dotted = node.module or ""
            if dotted == "minke":  # from minke import x / from .. import x: x is a submodule or a root name
                found += [(node.lineno, a.name if a.name in names else "__init__") for a in node.names]
            elif (t := _minke_target(dotted, names)) is not None:
                found.append((node.lineno, t))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, t) for a in node.names if (t := _minke_target(a.name, names)) is not None]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.func, (ast.Attribute, ast.Name))
              and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"):
            arg = node.args[0]  # import_module("minke.x") or f"minke.x.{name}": the constant head names the module
            head = arg.value if isinstance(arg, ast.Constant) else (
                arg.values[0].value if isinstance(arg, ast.JoinedStr) and arg.values
                and isinstance(arg.values[0], ast.Constant) else None)
            if isinstance(head, str) and (t := _minke_target(head.rstrip("."), names)) is not None:
                found.append((node.lineno, t))
    return found


def test_every_top_level_module_has_a_layer():
    missing = sorted(_top_level_names() - LAYER_OF.keys())
    assert not missing, (f"minke/{missing}: no layer in tests/test_layering.py LAYERS; add each where its imports "
                         "allow (as low as possible)")
    twice = sorted(n for n in LAYER_OF if sum(n in names for _, names in LAYERS) > 1)
    assert not twice, f"{twice} listed in more than one layer"


def test_no_module_imports_a_higher_layer():
    names = _top_level_names()
    bad = []
    for path in _modules():
        owner = _owner(path)
        if owner not in LAYER_OF:
            continue  # reported by test_every_top_level_module_has_a_layer
        rel = str(path.relative_to(MINKE))
        for line, target in imports_of(path, names):
            if target == owner or (rel, target) in ALLOWED:
                continue
            if target not in LAYER_OF or LAYER_OF[target] > LAYER_OF[owner]:
                bad.append(f"minke/{rel}:{line} ({LAYERS[LAYER_OF[owner]][0]} layer) imports minke.{target} "
                           f"({LAYERS[LAYER_OF[target]][0] if target in LAYER_OF else 'no'} layer)")
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def test_kernels_are_leaves():
    """Kernels import nothing of minke but other kernels (kernels/_triton.py included): models call them, never the
    other way round."""
    names = _top_level_names()
    bad = [f"{p.relative_to(MINKE.parent)}:{line} imports minke.{t}"
           for p in sorted((MINKE / "kernels").rglob("*.py")) for line, t in imports_of(p, names) if t != "kernels"]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source, owner, expected", [
    ("from ..models.moe import MoE\n", "kernels/x.py", ["models"]),
    ("from minke.engine import LLM\n", "kernels/x.py", ["engine"]),
    ("import minke.server.app as app\n", "kernels/x.py", ["server"]),
    ("def f():\n    from .. import tokenizer, __version__\n", "kernels/x.py", ["tokenizer", "__init__"]),
    ("from . import _triton\nfrom .router import route\n", "kernels/x.py", ["kernels", "kernels"]),
    ("import importlib\nimportlib.import_module(f'minke.commands.{n}')\n", "cli.py", ["commands"]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ...runner.worker import W\n", "models/a/b.py",
     ["runner"]),
    ("import torch\nfrom torch import nn\n", "kernels/x.py", []),
])
def test_imports_are_all_seen(tmp_path, source, owner, expected):
    """The parser finds every form of import (a file written under a fake minke/ tree)."""
    path = tmp_path / "minke" / owner
    path.parent.mkdir(parents=True)
    path.write_text(source)
    names = {"kernels", "models", "engine", "server", "tokenizer", "commands", "runner", "cli", "__init__"}
    assert [t for _, t in imports_of(path, names, tmp_path / "minke")] == expected
