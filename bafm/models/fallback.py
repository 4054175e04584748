"""Fast paths that degrade to simpler ones when they cannot be built, never because of a later error."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Set, Tuple

from torch import Tensor


def input_signature(args: Sequence[Any]) -> Tuple[Hashable, ...]:
    """What a compiled function (``dynamic=False``) or a CUDA graph is specialised on.

    Each tensor's shape, strides, dtype and device; other values as they are.
    """
    return tuple(
        (tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, Tensor) else ("value", a) for a in args
    )


class FallbackChain:
    """Calls the first working implementation of one function, fastest first.

    A fast path is built lazily: ``torch.compile`` compiles, and a CUDA graph is captured, on the
    first call with a new input signature (see ``input_signature``). If an implementation raises
    on such a first call, a warning names it and the error, it is dropped for good (its
    ``on_drop`` callback, if any, undoes in-place changes), and the call is retried with the next
    one. Once an implementation has run a signature, its errors on that signature are runtime
    errors (out of memory, bad values, an interrupt) and propagate without demoting the run; the
    last (eager) one's errors always propagate. This turns a missing compiler, a failed graph
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
        self._ran: Set[Tuple[Hashable, ...]] = set()  # signatures the active implementation has run

    @property
    def active(self) -> str:
        """Name of the implementation in use."""
        return self.implementations[0][0]

    def __call__(self, *args: Any) -> Any:
        """``fn(*args)`` of the first implementation that works."""
        if len(self.implementations) == 1:
            return self.implementations[0][1](*args)
        key = input_signature(args)
        while len(self.implementations) > 1:
            name, fn = self.implementations[0]
            if key in self._ran:
                return fn(*args)
            try:
                out = fn(*args)
            except Exception as err:  # building this fast path failed: degrade, report, continue
                reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:300]
                message = (f"{self.what}: '{name}' failed ({type(err).__name__}: {reason}); "
                           f"falling back to '{self.implementations[1][0]}'")  # fmt: skip
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                self.fallbacks.append(message)
                self.implementations.pop(0)
                self._ran.clear()
                if name in self.on_drop:
                    self.on_drop.pop(name)()
                continue
            self._ran.add(key)
            return out
        return self.implementations[0][1](*args)
