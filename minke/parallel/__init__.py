"""Tensor and expert parallelism, applied to the single-device model from outside (see tensor_parallel.py), and the
multi-process execution the engine uses for `tensor_parallel_size > 1` (launcher.py, runner.py)."""

from .state import ParallelConfig, check_model_fits

__all__ = ["ParallelConfig", "check_model_fits"]
