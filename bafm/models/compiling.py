"""``torch.compile`` for the backbone and the SideNet: modes, precisions, whole-model and regional compilation."""

from __future__ import annotations

from typing import Any, Callable, Dict, Union

import torch
from torch import nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# "model": the whole velocity is one graph; "blocks": each of ``module.blocks`` is compiled alone.
COMPILE_SCOPES = ("model", "blocks")
# A torch.compile backend: a registered name or a callable ``(GraphModule, example_inputs) -> callable``.
Backend = Union[str, Callable[..., Any]]
PRECISIONS: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Modes whose inductor code records its own CUDA graphs (which reuse output memory between calls).
INDUCTOR_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def backend_name(backend: Backend) -> str:
    """A backend's name for settings and messages."""
    return backend if isinstance(backend, str) else getattr(backend, "__name__", type(backend).__name__)


def enable_tf32() -> None:
    """Let float32 matmuls and convolutions use TF32 tensor cores (CUDA; harmless elsewhere)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")


def parse_precision(name: str) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` -> dtype.

    Raises:
        ValueError: unknown name, listing the valid ones.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision is '{name}', expected one of: {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def check_mode(mode: str, cuda_graphs: bool) -> None:
    """Raise ValueError for an unknown mode or inductor graphs combined with ``cuda_graphs``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode is '{mode}', expected one of: {', '.join(COMPILE_MODES)}")
    if cuda_graphs and mode in INDUCTOR_GRAPH_MODES:
        raise ValueError(
            f"compile mode '{mode}' records its own CUDA graphs; with cuda_graphs=True use "
            "'max-autotune-no-cudagraphs' or 'default'"
        )


def compile_fn(fn: Callable[..., Any], *, mode: str = "default", backend: Backend = "inductor",
               fullgraph: bool = True) -> Callable[..., Any]:
    """``torch.compile`` with static shapes (each batch size gets its own specialised kernels).

    Args:
        fn: function or bound method to compile.
        mode: one of ``COMPILE_MODES`` (inductor only; ignored for other backends).
        backend: ``"inductor"`` for generated kernels; ``"eager"`` / ``"aot_eager"`` only trace; or a
            custom backend callable.
        fullgraph: fail on any graph break instead of silently splitting the graph.

    Returns:
        The compiled callable (compilation happens lazily, at the first call).
    """
    raise_recompile_limit()
    if backend == "inductor":
        tune_inductor()
        return torch.compile(fn, mode=None if mode == "default" else mode, fullgraph=fullgraph, dynamic=False)
    return torch.compile(fn, backend=backend, fullgraph=fullgraph, dynamic=False)


def tune_inductor() -> None:
    """Inductor settings for these models (global, set when an inductor compile is requested).

    1x1 convolutions (SideNet pointwise convs, qkv and output projections) are lowered as matrix
    products on channels-last data, which lets max-autotune fuse the surrounding normalisation,
    modulation, SiLU and residual adds into the GEMM instead of extra passes over the activations.
    """
    import torch._inductor.config as inductor_config  # deferred: only compiled paths need inductor

    inductor_config.conv_1x1_as_mm = True


def raise_recompile_limit(limit: int = 64) -> None:
    """Allow one specialisation per batch shape and per block (dynamo's default keeps only 8)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < limit:
            setattr(config, name, limit)


def compile_blocks(module: nn.Module, *, mode: str = "default", backend: Backend = "inductor",
                   fullgraph: bool = True) -> Callable[[], None]:
    """Regional compilation: compile each of ``module.blocks`` in place instead of the whole model.

    Identical blocks (the 28 of SiT-XL/2) share one compiled graph, so compiling takes seconds
    per batch shape instead of a minute; the few ops between blocks stay eager (CUDA graphs
    remove their launch cost).

    Args:
        module: a model with an ``nn.ModuleList`` named ``blocks``.
        mode: inductor mode.
        backend: ``torch.compile`` backend.
        fullgraph: refuse graph breaks inside a block.

    Returns:
        A callable that restores the eager blocks.

    Raises:
        TypeError: the model has no ``blocks`` list.
    """
    blocks = getattr(module, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise TypeError(f"{type(module).__name__} has no 'blocks' ModuleList to compile block by block")
    raise_recompile_limit()
    kwargs: Dict[str, Any] = dict(fullgraph=fullgraph, dynamic=False)
    if backend == "inductor":
        tune_inductor()
        kwargs["mode"] = None if mode == "default" else mode
    else:
        kwargs["backend"] = backend
    for block in blocks:
        block.compile(**kwargs)

    def restore() -> None:
        """Put the eager forward back on every block."""
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set; None is the eager call

    return restore
