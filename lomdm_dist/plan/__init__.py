"""Capacity planning: parameters, FLOPs, memory per GPU and throughput of a config on a cluster,
from formulas checked against the model and against measurements (``tests/test_plan.py``)."""

from .activations import Numerics, Saved, Shape, Split, step_saved
from .params import ParamCount, count_parameters
from .planner import GPUS, Plan, expected_masked_fraction, format_plan, make_plan, numerics_for, resolve_vocab_size

__all__ = ["GPUS", "Numerics", "ParamCount", "Plan", "Saved", "Shape", "Split", "count_parameters",
           "expected_masked_fraction", "format_plan", "make_plan", "numerics_for", "resolve_vocab_size", "step_saved"]
