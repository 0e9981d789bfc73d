"""CUDA graphs (issue 6, the GPU path): a loop of many small kernels captured once and replayed as one launch.

An ensemble's acting loop is some 20 kernels per step for 100 steps, and each learning epoch runs the recurrence's 100
steps forward and backward; each kernel takes a few microseconds on the GPU but some ten to launch from Python, so
without graphs the GPU waits on the host. :class:`Captured` records ``fn`` once on static input buffers and then
replays it: the same kernels on the same memory, so the results are those of calling ``fn`` (the kernels do not
change, only who launches them; ``tests/test_ensemble.py`` compares the two on CUDA).

Rules for ``fn`` (those of ``torch.cuda.graph``): only CUDA work on tensors (no host reads: a capture that syncs
fails), no random numbers (draw them outside and pass them in), and its Python side effects happen once, at capture.
It may run ``backward()``: parameters' ``.grad`` must be None when it is captured (call ``zero_grad(set_to_none=True)``
first); the captured backward then owns the gradient buffers and every replay overwrites them, so nothing may set
them to None afterwards.
"""

from __future__ import annotations

from typing import Callable

import torch


class Captured:
    """``fn(*inputs)`` as a CUDA graph. ``inputs`` are example tensors whose shapes, dtypes and device every call must
    repeat; :meth:`__call__` copies the new inputs into the static buffers, replays and returns the static outputs
    (``fn``'s own return value, whatever structure of tensors): they stay valid until the next call. ``warmup`` eager
    calls on a side stream come first, as capture requires (their results are discarded: pass ``before_capture`` to
    undo their side effects, such as accumulated gradients)."""

    def __init__(self, fn: Callable, inputs: tuple[torch.Tensor, ...], warmup: int = 2,
                 before_capture: Callable[[], None] | None = None):
        self.inputs = tuple(x.detach().clone() for x in inputs)
        self.device = self.inputs[0].device
        with torch.cuda.device(self.device):  # streams and capture on the inputs' GPU, whichever is current
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            if before_capture is not None:
                before_capture()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.inputs):
            raise ValueError(f"captured with {len(self.inputs)} inputs, called with {len(inputs)}")
        for static, x in zip(self.inputs, inputs):
            if x.shape != static.shape or x.dtype != static.dtype:
                raise ValueError(f"captured for {list(static.shape)} {static.dtype}, called with {list(x.shape)} "
                                 f"{x.dtype}")
            static.copy_(x)
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.outputs
