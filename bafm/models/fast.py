"""Speed switches for the backbone and the SideNet: precision, channels-last, torch.compile, CUDA graphs.

``optimize_for_inference`` wraps a model so that its ``.velocity`` keeps its signature and its
float32 interface (solver state and velocities stay in the caller's dtype) while the network
inside runs in ``dtype``, on channels-last (NHWC) activations, compiled and optionally replayed
from CUDA graphs. Every fast path falls back to the next simpler one (graphs -> compiled ->
eager) with a warning if it cannot be built, so the same config runs on a CPU-only machine
(``bafm.models.fallback``).

A model declares which velocity it has in a class attribute ``velocity_kind``:
``"backbone"`` for ``velocity(x, t, y)``, ``"side"`` for ``velocity(x, v, t, h, y)``, and
``"side_offset"`` for a side model whose ``velocity`` is ``v + forward(x, v, t, h, y)`` (the
SideNet). For the latter only the offset runs in ``dtype``; ``v + offset`` is added in the
caller's dtype, so ``S(x, v, t, 0) = v`` stays exact in float32 even with a bf16 network.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from bafm.models.compiling import (
    COMPILE_SCOPES,
    INDUCTOR_GRAPH_MODES,
    Backend,
    backend_name,
    check_mode,
    compile_blocks,
    compile_fn,
    parse_precision,
)
from bafm.models.cuda_graphs import GraphedFunction
from bafm.models.fallback import FallbackChain

VELOCITY_KINDS = ("backbone", "side", "side_offset")


def _to_layout(x: Tensor, dtype: Optional[torch.dtype], channels_last: bool) -> Tensor:
    """Cast a state-like tensor to the network's dtype and (for 4-D) channels-last storage."""
    if channels_last and x.dim() == 4:
        return x.to(dtype=dtype or x.dtype, memory_format=torch.channels_last)
    return x.to(dtype=dtype or x.dtype)

def _module_device(module: nn.Module) -> torch.device:
    """Device of the first parameter or buffer (CPU for a module with neither)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def velocity_kind(module: nn.Module) -> str:
    """The ``velocity_kind`` a model declares (see the module docstring).

    Raises:
        TypeError: no ``velocity`` method, or no known ``velocity_kind``.
    """
    velocity = getattr(module, "velocity", None)
    if velocity is None or not callable(velocity):
        raise TypeError(f"{type(module).__name__} has no .velocity method to optimise")
    kind = getattr(module, "velocity_kind", None)
    if kind not in VELOCITY_KINDS:
        raise TypeError(
            f"{type(module).__name__}.velocity_kind is {kind!r}, expected one of {VELOCITY_KINDS}: "
            "'backbone' for velocity(x, t, y), 'side' for velocity(x, v, t, h, y), 'side_offset' for "
            "velocity(x, v, t, h, y) = v + forward(x, v, t, h, y)"
        )
    return kind


class FastVelocity(nn.Module):
    """A backbone or SideNet whose ``.velocity`` runs through the configured fast path.

    ``velocity`` (and ``forward``, the same) take and return what the wrapped model's
    ``velocity`` does: ``(x, t, y)`` for a backbone, ``(x, v, t, h, y)`` for a SideNet, all in the
    caller's dtype and layout. Calls run without gradients. Other attributes (``num_classes``,
    ``in_channels``, ``config``, ...) are read from the wrapped model.
    """

    def __init__(self, module: nn.Module, *, compile: bool, mode: str, channels_last: bool,
                 dtype: Optional[torch.dtype], cuda_graphs: bool = False, backend: Backend = "inductor",
                 fullgraph: bool = True, compile_scope: str = "model") -> None:
        """Wrap ``module`` (already cast and laid out); arguments as in :func:`optimize_for_inference`."""
        super().__init__()
        check_mode(mode, cuda_graphs)
        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope is '{compile_scope}', expected one of: {', '.join(COMPILE_SCOPES)}")
        self.module = module
        self.dtype = dtype
        self._device_type = _module_device(module).type
        self.channels_last = channels_last
        self.settings: Dict[str, Any] = dict(
            compile=compile, mode=mode, channels_last=channels_last, cuda_graphs=cuda_graphs,
            dtype=str(dtype).replace("torch.", "") if dtype is not None else "as loaded",
            backend=backend_name(backend), fullgraph=fullgraph, compile_scope=compile_scope)  # fmt: skip
        cores: Dict[str, Callable[..., Tensor]] = {
            "backbone": self._backbone_velocity, "side": self._side_generic_velocity,
            "side_offset": self._side_offset_velocity,
        }
        core = cores[velocity_kind(module)]
        chain: List[Tuple[str, Callable[..., Tensor]]] = [("eager", core)]
        restore: Dict[str, Callable[[], None]] = {}
        if compile and compile_scope == "model":
            compiled = compile_fn(core, mode=mode, backend=backend, fullgraph=fullgraph)
            chain.insert(0, (f"compiled[{backend_name(backend)}:{mode}]", compiled))
        elif compile:  # blocks: compiled in place, so dropping this path must restore them
            name = f"compiled-blocks[{backend_name(backend)}:{mode}]"
            restore[name] = compile_blocks(module, mode=mode, backend=backend, fullgraph=fullgraph)
            chain.insert(0, (name, core))
        if cuda_graphs:
            head_name, head = chain[0]
            if _module_device(module).type == "cuda":
                self.graphed: Optional[GraphedFunction] = GraphedFunction(head)
                chain.insert(0, (f"cuda-graphs+{head_name}", self.graphed))
            else:
                self.graphed = None
                self.settings["cuda_graphs_skipped"] = "model is not on a CUDA device"
        else:
            self.graphed = None
        self.chain = FallbackChain(chain, type(module).__name__, on_drop=restore)

    # Cores: cast the big state tensors in, run the network, cast the result back to the caller's dtype.
    def _side_offset_velocity(self, x: Tensor, v: Tensor, t: Tensor, h: Tensor, y: Tensor,
                              features: Optional[Tensor] = None) -> Tensor:
        """SideNet: the offset in the network's dtype, ``v + offset`` in the caller's."""
        extra = () if features is None else (features.to(self.dtype or features.dtype),)
        offset = self.module(_to_layout(x, self.dtype, self.channels_last),
                             _to_layout(v, self.dtype, self.channels_last), t, h, y, *extra)  # fmt: skip
        return v + offset.to(dtype=v.dtype, memory_format=torch.contiguous_format)

    def _side_generic_velocity(self, x: Tensor, v: Tensor, t: Tensor, h: Tensor, y: Tensor) -> Tensor:
        """Any other ``velocity(x, v, t, h, y)`` model, cast in and out."""
        out = self.module.velocity(_to_layout(x, self.dtype, self.channels_last),
                                   _to_layout(v, self.dtype, self.channels_last), t, h, y)  # fmt: skip
        return out.to(dtype=v.dtype, memory_format=torch.contiguous_format)

    def _backbone_velocity(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Backbone ``velocity(x, t, y)``, cast in and out."""
        out = self.module.velocity(_to_layout(x, self.dtype, self.channels_last), t, y)
        return out.to(dtype=x.dtype, memory_format=torch.contiguous_format)

    @property
    def active_path(self) -> str:
        """The implementation in use: ``"cuda-graphs+compiled[...]"``, ``"compiled[...]"`` or ``"eager"``."""
        return self.chain.active

    @property
    def fallbacks(self) -> List[str]:
        """Warnings of fast paths that failed and were dropped (empty when all went well)."""
        return self.chain.fallbacks

    def velocity(self, *args: Any, features: Optional[Tensor] = None) -> Tensor:
        """The wrapped model's ``velocity(*args)``, through the fast path, without gradients.

        ``features=`` (backbone tokens for a SideNet that reads them) is passed on as the last
        positional argument.

        With an explicit ``dtype`` the network runs in it, so a caller's autocast region (the
        training loss) is switched off inside: it would only add casts to float32 and back.
        """
        autocast = torch.autocast(self._device_type, enabled=False) if self.dtype is not None else nullcontext()
        with torch.no_grad(), autocast:
            return self.chain(*args) if features is None else self.chain(*args, features)

    def forward(self, *args: Any) -> Tensor:
        """Same as :meth:`velocity`."""
        return self.velocity(*args)

    def __getattr__(self, name: str) -> Any:
        """Attributes not found on the wrapper come from the wrapped model."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = super().__getattr__("module")
            return getattr(module, name)


def optimize_for_inference(module: nn.Module, *, compile: bool, mode: str = "max-autotune-no-cudagraphs",
                           channels_last: bool = True, dtype: Optional[torch.dtype] = None,
                           cuda_graphs: bool = False, backend: Backend = "inductor",
                           fullgraph: bool = True, compile_scope: str = "model") -> FastVelocity:
    """Prepare a frozen backbone or SideNet for fast sampling.

    The module is converted in place (``eval()``, no gradients, parameters cast to ``dtype``,
    conv weights channels-last) and wrapped; pass a copy if the original must stay as it is
    (e.g. a SideNet that is still being trained).

    Args:
        module: a model with ``.velocity(x, t, y)`` (backbone) or ``.velocity(x, v, t, h, y)``
            (SideNet).
        compile: wrap the velocity computation in ``torch.compile(fullgraph=True, dynamic=False)``.
        mode: inductor mode, one of ``COMPILE_MODES``.
        channels_last: NHWC activations (fused channel RMSNorm and copy-free attention in the
            SideNet; contiguous tokens straight out of the SiT patch embedding).
        dtype: network precision (e.g. ``torch.bfloat16``); None keeps the module's.
        cuda_graphs: replay one CUDA graph per input shape (ignored, with a note in
            ``settings``, when the model is not on CUDA). Needs a mode without inductor graphs.
        backend: ``torch.compile`` backend; ``"eager"`` traces only (cheap, for tests).
        fullgraph: refuse graph breaks.
        compile_scope: ``"model"`` (one graph) or ``"blocks"`` (regional: each of
            ``module.blocks``; far quicker to compile for deep backbones).

    Returns:
        A :class:`FastVelocity` with the same ``.velocity`` API.

    Raises:
        ValueError: unknown mode, or inductor CUDA graphs combined with ``cuda_graphs``.
        TypeError: the module has no ``velocity`` or declares no known ``velocity_kind``.
    """
    module.eval().requires_grad_(False)
    if dtype is not None:
        module.to(dtype=dtype)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return FastVelocity(module, compile=compile, mode=mode, channels_last=channels_last, dtype=dtype,
                        cuda_graphs=cuda_graphs, backend=backend, fullgraph=fullgraph,
                        compile_scope=compile_scope)  # fmt: skip


def apply_speed_switches(module: nn.Module, *, compile: bool, compile_mode: str, channels_last: bool,
                         cuda_graphs: bool, precision: str, compile_scope: str = "model") -> nn.Module:
    """Apply the speed switches of a ``backbone`` / ``sidenet`` config section to a frozen model.

    With every switch off (no compile, no graphs, float32, contiguous) the module is returned
    unchanged.

    Args:
        module: the loaded model (on its target device).
        compile: ``torch.compile`` the velocity.
        compile_mode: inductor mode, one of ``COMPILE_MODES``.
        channels_last: NHWC activations.
        cuda_graphs: replay CUDA graphs (CUDA only).
        precision: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        compile_scope: ``"model"`` or ``"blocks"``.

    Returns:
        The module itself, or its :class:`FastVelocity` wrapper.

    Raises:
        ValueError: a bad ``compile_mode`` or ``precision``, naming the value.
    """
    dtype = parse_precision(str(precision))
    if not compile and not cuda_graphs and dtype == torch.float32 and not channels_last:
        return module
    param = next(module.parameters(), None)
    keep_dtype = dtype == torch.float32 and (param is None or param.dtype == torch.float32)
    return optimize_for_inference(module, compile=bool(compile), mode=str(compile_mode),
                                  channels_last=bool(channels_last), dtype=None if keep_dtype else dtype,
                                  cuda_graphs=bool(cuda_graphs), compile_scope=str(compile_scope))  # fmt: skip


def training_velocity(sidenet: nn.Module, *, compile: bool, mode: str = "max-autotune-no-cudagraphs",
                      channels_last: bool = True, backend: Backend = "inductor",
                      fullgraph: bool = True) -> Callable[..., Tensor]:
    """A trainable SideNet's ``velocity`` for the chain loss, channels-last and optionally compiled.

    Parameters stay in their dtype (use autocast for bf16 mixed precision) and keep their
    gradients; conv weights are made channels-last in place (exports call ``.contiguous()``).

    Args:
        sidenet: the SideNet being trained.
        compile: ``torch.compile`` the velocity (forward and backward through AOTAutograd).
        mode: inductor mode (no inductor CUDA graphs: the loss keeps several outputs alive).
        channels_last: NHWC activations.
        backend: ``torch.compile`` backend.
        fullgraph: refuse graph breaks.

    Returns:
        ``velocity(x, v, t, h, y) -> v_hat`` with the eager path as fallback.
    """
    check_mode(mode, cuda_graphs=False)
    if compile and mode in INDUCTOR_GRAPH_MODES:
        raise ValueError(
            f"compile mode '{mode}' records CUDA graphs that reuse output memory, but the chain loss "
            "keeps several SideNet outputs alive; use 'max-autotune-no-cudagraphs' or 'default'"
        )
    if channels_last:
        sidenet.to(memory_format=torch.channels_last)

    def velocity(x: Tensor, v: Tensor, t: Tensor, h: Tensor, y: Tensor, features: Optional[Tensor] = None) -> Tensor:
        """``sidenet.velocity`` on channels-last inputs, returned contiguous."""
        out = sidenet.velocity(_to_layout(x, None, channels_last), _to_layout(v, None, channels_last), t, h, y,
                               features)  # fmt: skip
        return out.contiguous()

    chain: List[Tuple[str, Callable[..., Tensor]]] = [("eager", velocity)]
    if compile:
        chain.insert(0, (f"compiled[{backend_name(backend)}:{mode}]", compile_fn(velocity, mode=mode, backend=backend,
                                                                   fullgraph=fullgraph)))  # fmt: skip
    return FallbackChain(chain, type(sidenet).__name__)
