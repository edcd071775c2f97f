"""torch.compile helpers that cost nothing at import time."""
from __future__ import annotations


def constant_result(fn):
    """Mark ``fn`` like ``torch.compiler.assume_constant_result``: Dynamo calls it once while tracing and
    bakes the result into the graph, so it never breaks a graph. For Python values (the backend choice):
    a tensor result is named after the function, so two different ones in a graph collide, and the
    arguments must be concrete; the ops' constant tensors come from small ops instead (freq_mix.keep_positions).

    ``torch.compiler.assume_constant_result`` imports torch._dynamo, which imports triton when installed:
    about a second added to ``import fastmix``. The marker it sets is this one attribute, so we set it
    directly; tests/test_opcheck_compile.py fails if a torch release changes the mechanism.
    """
    fn._dynamo_marked_constant = True
    return fn
