"""Training: one loop (``trainers.loop.train``) and one small module per method.

Importing this package registers every method; ``get_method(name)`` looks one up.
"""

from saebench.trainers import abstopk, batchtopk, choice, e2e, gsae, jumprelu, topk, variational  # noqa: F401  (registers)
from saebench.trainers.base import METHODS, Method, StepInput, StepOutput, get_method, register

__all__ = ["METHODS", "Method", "StepInput", "StepOutput", "get_method", "register"]
