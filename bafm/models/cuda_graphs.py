"""CUDA graph replay of an inference function, one graph per input signature."""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, List, Sequence, Tuple

import torch
from torch import Tensor

from bafm.models.fallback import input_signature


class GraphedFunction:
    """Replays one CUDA graph per input signature (shapes, dtypes, devices, non-tensor values).

    The first call with a new signature warms ``fn`` up on a side stream (this is where
    ``torch.compile`` compiles and autotunes) and captures it. Each call copies its tensors into
    the graph's static inputs, replays, and returns a clone of the static output, so results
    stay valid whatever runs next. Gradients are not recorded: for inference only.
    """

    def __init__(self, fn: Callable[..., Tensor], warmup: int = 3) -> None:
        """Wrap ``fn(*tensors_or_scalars) -> Tensor``; ``warmup`` calls precede each capture."""
        self.fn = fn
        self.warmup = warmup
        self._graphs: Dict[Tuple[Hashable, ...], Tuple[List[Any], Tensor, "torch.cuda.CUDAGraph"]] = {}

    def _capture(self, args: Sequence[Any]) -> Tuple[List[Any], Tensor, "torch.cuda.CUDAGraph"]:
        """Warm up on a side stream, then capture; returns (static inputs, static output, graph)."""
        static = [a.clone() if isinstance(a, Tensor) else a for a in args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            out = self.fn(*static)
        return static, out, graph

    def __call__(self, *args: Any) -> Tensor:
        """``fn(*args)`` from the replayed graph (a fresh tensor, safe to keep)."""
        key = input_signature(args)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(args)
        static, out, graph = entry
        for dst, src in zip(static, args):
            if isinstance(dst, Tensor):
                dst.copy_(src)
        graph.replay()
        return out.clone()

    @property
    def num_graphs(self) -> int:
        """Number of captured graphs (one per input signature seen)."""
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every captured graph and its memory."""
        self._graphs.clear()
