"""Serving LoRA adapters: many per step, on the MLA / attention projections, dense and shared MLPs and the routed
experts (request.py LoRARequest, adapter.py PEFT format, layers.py / model.py module swaps, manager.py slots)."""

from .adapter import AdapterError
from .config import LoRAConfig
from .request import LoRARequest

__all__ = ["AdapterError", "LoRAConfig", "LoRARequest"]
