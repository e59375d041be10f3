"""Replay the video encoder's forward pass as one CUDA graph.

TempMe's encoder launches several hundred small kernels per call (every merge matches, sorts,
gathers and scatters), and in its last layers, where few tokens are left, launching them takes the
CPU longer than running them takes the GPU. Its merge schedule is fixed when the model is built, so
for a given input shape every call runs the same kernels on the same shapes: a CUDA graph records
them once and replays them with a single launch.
"""

from __future__ import annotations

from typing import Callable

import torch


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
