"""Speed switches for the backbone and the SideNet: precision, channels-last, torch.compile, CUDA graphs.

``optimize_for_inference`` wraps a model so that its ``.velocity`` keeps its signature and its
float32 interface (solver state and velocities stay in the caller's dtype) while the network
inside runs in ``dtype``, on channels-last (NHWC) activations, compiled and optionally replayed
from CUDA graphs. Every fast path falls back to the next simpler one (graphs -> compiled ->
eager) with a warning if it fails, so the same config runs on a CPU-only machine.

The SideNet is special-cased: only its offset runs in ``dtype``; ``v + offset`` is added in the
caller's dtype, so ``S(x, v, t, 0) = v`` stays exact in float32 even with a bf16 network.
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from bafm.models.sidenet import SideNet

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# "model": the whole velocity is one graph; "blocks": each of ``module.blocks`` is compiled alone.
COMPILE_SCOPES = ("model", "blocks")
# A torch.compile backend: a registered name or a callable ``(GraphModule, example_inputs) -> callable``.
Backend = Union[str, Callable[..., Any]]
PRECISIONS: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Modes whose inductor code records its own CUDA graphs (which reuse output memory between calls).
_INDUCTOR_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _backend_name(backend: Backend) -> str:
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


def _check_mode(mode: str, cuda_graphs: bool) -> None:
    """Raise ValueError for an unknown mode or inductor graphs combined with ``cuda_graphs``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode is '{mode}', expected one of: {', '.join(COMPILE_MODES)}")
    if cuda_graphs and mode in _INDUCTOR_GRAPH_MODES:
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
    _raise_recompile_limit()
    if backend == "inductor":
        _tune_inductor()
        return torch.compile(fn, mode=None if mode == "default" else mode, fullgraph=fullgraph, dynamic=False)
    return torch.compile(fn, backend=backend, fullgraph=fullgraph, dynamic=False)


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
        self._graphs: Dict[Tuple[Any, ...], Tuple[List[Any], Tensor, "torch.cuda.CUDAGraph"]] = {}

    @staticmethod
    def _signature(args: Sequence[Any]) -> Tuple[Any, ...]:
        """Cache key of one call: each tensor's shape, strides, dtype and device, other values as is."""
        return tuple(
            (tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, Tensor) else ("value", a) for a in args
        )

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
        key = self._signature(args)
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


class FallbackChain:
    """Calls the first working implementation of one function, fastest first.

    If an implementation raises, a warning names it and the error, it is dropped for good (its
    ``on_drop`` callback, if any, undoes in-place changes), and the call is retried with the next
    one; the last (eager) one's errors propagate. This turns a missing compiler, a failed graph
    capture or an unsupported backend into a slower run rather than a crash, and the reason is
    kept in ``fallbacks``.
    """

    def __init__(self, implementations: Sequence[Tuple[str, Callable[..., Any]]], what: str,
                 on_drop: Optional[Dict[str, Callable[[], None]]] = None) -> None:
        """``implementations``: ``(name, fn)`` pairs, fastest first, the last one eager."""
        if not implementations:
            raise ValueError("FallbackChain needs at least one implementation")
        self.implementations = list(implementations)
        self.what = what
        self.on_drop = dict(on_drop or {})
        self.fallbacks: List[str] = []

    @property
    def active(self) -> str:
        """Name of the implementation in use."""
        return self.implementations[0][0]

    def __call__(self, *args: Any) -> Any:
        """``fn(*args)`` of the first implementation that works."""
        while len(self.implementations) > 1:
            name, fn = self.implementations[0]
            try:
                return fn(*args)
            except Exception as err:  # any failure of a fast path: degrade, report, continue
                reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:300]
                message = (f"{self.what}: '{name}' failed ({type(err).__name__}: {reason}); "
                           f"falling back to '{self.implementations[1][0]}'")  # fmt: skip
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                self.fallbacks.append(message)
                self.implementations.pop(0)
                if name in self.on_drop:
                    self.on_drop.pop(name)()
        return self.implementations[0][1](*args)


def _to_layout(x: Tensor, dtype: Optional[torch.dtype], channels_last: bool) -> Tensor:
    """Cast a state-like tensor to the network's dtype and (for 4-D) channels-last storage."""
    if channels_last and x.dim() == 4:
        return x.to(dtype=dtype or x.dtype, memory_format=torch.channels_last)
    return x.to(dtype=dtype or x.dtype)


def _tune_inductor() -> None:
    """Inductor settings for these models (global, set when an inductor compile is requested).

    1x1 convolutions (SideNet pointwise convs, qkv and output projections) are lowered as matrix
    products on channels-last data, which lets max-autotune fuse the surrounding normalisation,
    modulation, SiLU and residual adds into the GEMM instead of extra passes over the activations.
    """
    import torch._inductor.config as inductor_config  # deferred: only compiled paths need inductor

    inductor_config.conv_1x1_as_mm = True


def _raise_recompile_limit(limit: int = 64) -> None:
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
    _raise_recompile_limit()
    kwargs: Dict[str, Any] = dict(fullgraph=fullgraph, dynamic=False)
    if backend == "inductor":
        _tune_inductor()
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


def _module_device(module: nn.Module) -> torch.device:
    """Device of the first parameter or buffer (CPU for a module with neither)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _velocity_arity(module: nn.Module) -> int:
    """Number of arguments of ``module.velocity`` (3: backbone, 5: SideNet); TypeError if absent."""
    velocity = getattr(module, "velocity", None)
    if velocity is None or not callable(velocity):
        raise TypeError(f"{type(module).__name__} has no .velocity method to optimise")
    return len(inspect.signature(velocity).parameters)


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
        _check_mode(mode, cuda_graphs)
        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope is '{compile_scope}', expected one of: {', '.join(COMPILE_SCOPES)}")
        self.module = module
        self.dtype = dtype
        self._device_type = _module_device(module).type
        self.channels_last = channels_last
        self.settings: Dict[str, Any] = dict(
            compile=compile, mode=mode, channels_last=channels_last, cuda_graphs=cuda_graphs,
            dtype=str(dtype).replace("torch.", "") if dtype is not None else "as loaded",
            backend=_backend_name(backend), fullgraph=fullgraph, compile_scope=compile_scope)  # fmt: skip
        arity = _velocity_arity(module)
        if isinstance(module, SideNet):
            core: Callable[..., Tensor] = self._side_offset_velocity
        elif arity == 5:
            core = self._side_generic_velocity
        elif arity == 3:
            core = self._backbone_velocity
        else:
            raise TypeError(
                f"{type(module).__name__}.velocity takes {arity} arguments; expected (x, t, y) for a "
                "backbone or (x, v, t, h, y) for a SideNet"
            )
        chain: List[Tuple[str, Callable[..., Tensor]]] = [("eager", core)]
        restore: Dict[str, Callable[[], None]] = {}
        if compile and compile_scope == "model":
            compiled = compile_fn(core, mode=mode, backend=backend, fullgraph=fullgraph)
            chain.insert(0, (f"compiled[{_backend_name(backend)}:{mode}]", compiled))
        elif compile:  # blocks: compiled in place, so dropping this path must restore them
            name = f"compiled-blocks[{_backend_name(backend)}:{mode}]"
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
    def _side_offset_velocity(self, x: Tensor, v: Tensor, t: Tensor, h: Tensor, y: Tensor) -> Tensor:
        """SideNet: the offset in the network's dtype, ``v + offset`` in the caller's."""
        offset = self.module(_to_layout(x, self.dtype, self.channels_last),
                             _to_layout(v, self.dtype, self.channels_last), t, h, y)  # fmt: skip
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

    def velocity(self, *args: Any) -> Tensor:
        """The wrapped model's ``velocity(*args)``, through the fast path, without gradients.

        With an explicit ``dtype`` the network runs in it, so a caller's autocast region (the
        training loss) is switched off inside: it would only add casts to float32 and back.
        """
        autocast = torch.autocast(self._device_type, enabled=False) if self.dtype is not None else nullcontext()
        with torch.no_grad(), autocast:
            return self.chain(*args)

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
        TypeError: the module has no ``velocity`` with a known signature.
    """
    module.eval().requires_grad_(False)
    if dtype is not None:
        module.to(dtype=dtype)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return FastVelocity(module, compile=compile, mode=mode, channels_last=channels_last, dtype=dtype,
                        cuda_graphs=cuda_graphs, backend=backend, fullgraph=fullgraph,
                        compile_scope=compile_scope)  # fmt: skip


def optimize_from_config(module: nn.Module, cfg: Any) -> nn.Module:
    """Apply a ``BackboneConfig`` / ``SideNetConfig``'s speed switches to a frozen model.

    With every switch off (no compile, no graphs, float32) the module is returned unchanged.

    Args:
        module: the loaded model (on its target device).
        cfg: object with ``compile``, ``compile_mode``, ``channels_last``, ``cuda_graphs``,
            ``precision`` and optionally ``compile_scope`` (the ``sidenet`` / ``backbone`` section of
            the experiment config).

    Returns:
        The module itself, or its :class:`FastVelocity` wrapper.

    Raises:
        ValueError: a bad ``compile_mode`` or ``precision``, naming the value.
    """
    dtype = parse_precision(str(cfg.precision))
    if not cfg.compile and not cfg.cuda_graphs and dtype == torch.float32 and not cfg.channels_last:
        return module
    param = next(module.parameters(), None)
    keep_dtype = dtype == torch.float32 and (param is None or param.dtype == torch.float32)
    return optimize_for_inference(module, compile=bool(cfg.compile), mode=str(cfg.compile_mode),
                                  channels_last=bool(cfg.channels_last), dtype=None if keep_dtype else dtype,
                                  cuda_graphs=bool(cfg.cuda_graphs),
                                  compile_scope=str(getattr(cfg, "compile_scope", "model")))  # fmt: skip


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
    _check_mode(mode, cuda_graphs=False)
    if compile and mode in _INDUCTOR_GRAPH_MODES:
        raise ValueError(
            f"compile mode '{mode}' records CUDA graphs that reuse output memory, but the chain loss "
            "keeps several SideNet outputs alive; use 'max-autotune-no-cudagraphs' or 'default'"
        )
    if channels_last:
        sidenet.to(memory_format=torch.channels_last)

    def velocity(x: Tensor, v: Tensor, t: Tensor, h: Tensor, y: Tensor) -> Tensor:
        """``sidenet.velocity`` on channels-last inputs, returned contiguous."""
        out = sidenet.velocity(_to_layout(x, None, channels_last), _to_layout(v, None, channels_last), t, h, y)
        return out.contiguous()

    chain: List[Tuple[str, Callable[..., Tensor]]] = [("eager", velocity)]
    if compile:
        chain.insert(0, (f"compiled[{_backend_name(backend)}:{mode}]", compile_fn(velocity, mode=mode, backend=backend,
                                                                   fullgraph=fullgraph)))  # fmt: skip
    return FallbackChain(chain, type(sidenet).__name__)
