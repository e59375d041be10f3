"""Replay the video encoder's forward pass as one CUDA graph (and, for training, its backward pass as another).

TempMe's encoder launches several hundred small kernels per call (every merge matches, sorts,
gathers and scatters), and in its last layers, where few tokens are left, launching them takes the
CPU longer than running them takes the GPU. Its merge schedule is fixed when the model is built, so
for a given input shape every call runs the same kernels on the same shapes: a CUDA graph records
them once and replays them with a single launch.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class GraphedForward:
    """``module(x)`` captured as a CUDA graph for inputs shaped like ``example``; inference only.

    Calling copies ``x`` into the graph's input buffer and replays the graph. The returned tensor is
    the graph's output buffer: the next call overwrites it, so clone it to keep it. Build a new
    ``GraphedForward`` for another batch size (a final short batch can also run eagerly).
    """

    def __init__(self, module: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, warmup: int = 3):
        if not example.is_cuda:
            raise ValueError(f"CUDA graphs need a CUDA input, got one on {example.device}")
        self.static_input = example.clone()
        device = example.device
        # Warm-up on a side stream, as capture requires: lazy initialisation (cuBLAS handles, kernel
        # choices) must happen before recording, not during it.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(warmup):
                module(self.static_input)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.static_output = module(self.static_input)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_input.shape or x.dtype != self.static_input.dtype:
            raise ValueError(
                f"this graph was captured for inputs {list(self.static_input.shape)} {self.static_input.dtype}, "
                f"got {list(x.shape)} {x.dtype}"
            )
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output


def graph_for_training(
    module: nn.Module, example: torch.Tensor, dtype: torch.dtype = torch.float32, allow_unused: bool = False
) -> nn.Module:
    """Capture ``module``'s forward and backward passes on inputs shaped like ``example`` as CUDA
    graphs (``torch.cuda.make_graphed_callables``), for training steps that launch the same kernels
    every time. Returns ``module`` itself, whose forward now replays the graphs while it stays in the
    training state it was captured in (in the other state it runs eagerly).

    Call it with one tensor shaped and typed like ``example``; another shape is an error, so a short
    last batch needs an eager model. ``dtype``: autocast's, when steps run under
    ``torch.autocast(..., cache_enabled=False)`` (graphs cannot use autocast's cache of cast weights).
    Parameter gradients are the graph's own buffers: set them to None before every backward pass
    (``zero_grad(set_to_none=True)``); a second backward pass into existing gradients does not add
    up as in eager mode. ``allow_unused``: parameters that the forward does not use get no gradient,
    instead of an error (the merge-free baseline ignores clip positional embeddings).
    """
    if not example.is_cuda:
        raise ValueError(f"CUDA graphs need a CUDA input, got one on {example.device}")
    mixed = dtype != torch.float32
    with torch.autocast("cuda", dtype=dtype, enabled=mixed, cache_enabled=False):
        return torch.cuda.make_graphed_callables(module, (example,), allow_unused_input=allow_unused)
