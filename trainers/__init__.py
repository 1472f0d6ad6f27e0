"""Training: one loop (``trainers.loop.train``) and one small module per method.

Importing this package registers every method; ``get_method(name)`` looks one up.
"""

from saebench.trainers import (  # noqa: F401  (registers)
    abstopk,
    batchtopk,
    choice,
    e2e,
    gated,
    gsae,
    itda,
    jumprelu,
    matching_pursuit,
    matryoshka,
    standard,
    topafa,
    topk,
    variational,
)
from saebench.trainers.base import METHODS, Method, StepInput, StepOutput, get_method, register

__all__ = ["METHODS", "Method", "StepInput", "StepOutput", "get_method", "register"]
