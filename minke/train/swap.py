"""Module swaps from outside the model (gpt-fast's style): an instance's class becomes a subclass that mixes a
training-path forward in front of its own, so parameters, state-dict names and PEFT wrapping stay as they were."""

from __future__ import annotations

from torch import nn

_CLASSES: dict[tuple[type, type], type] = {}


def mix_into(model: nn.Module, target: type, mixin: type) -> int:
    """Every `target` module of `model` gets `mixin` in front of its class (one generated class per (mixin, base),
    named Train<Base>). Returns how many modules have the mixin (already switched ones count too)."""
    n = 0
    for m in model.modules():
        if isinstance(m, target):
            base = type(m)
            if not issubclass(base, mixin):
                key = (mixin, base)
                if key not in _CLASSES:
                    _CLASSES[key] = type(f"Train{base.__name__}", (mixin, base), {})
                m.__class__ = _CLASSES[key]
            n += 1
    return n
