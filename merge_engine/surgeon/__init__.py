"""mergekit-tokensurgeon: transplant a donor's tokenizer onto a model (see surgery.py)."""

from .approximate import Approximation, Method
from .surgery import SurgeryError, SurgeryOptions, run_tokensurgeon

__all__ = ["Approximation", "Method", "SurgeryError", "SurgeryOptions", "run_tokensurgeon"]
