"""Optimized time grids on disk: one JSON file of grids per (solver, NFE), with how they were found.

Layout (``format`` 1)::

    {"format": 1,
     "grids": {"ba": {"5": [1.0, 0.83, ..., 0.0], ...}, "euler": {...}},
     "objective": {...}, "search": {...}, "calibration": {...}, ...}

Everything except ``format`` and ``grids`` is free-form metadata (seeds, objective, search
settings, objective values) kept for the record. Grids are plain lists of times from 1 to 0,
strictly decreasing, ``steps + 1`` points; any solver takes them as ``t_grid``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from bafm.solvers.grids import steps_for_nfe

GRID_FILE_FORMAT = 1


def check_grid_values(values: Sequence[float], where: str) -> List[float]:
    """Raise unless ``values`` is a strictly decreasing grid of finite floats from exactly 1 to 0."""
    out = [float(v) for v in values]
    if len(out) < 2 or out[0] != 1.0 or out[-1] != 0.0:
        raise ValueError(f"{where}: a grid must run from 1.0 to 0.0 with at least 2 points, got {out}")
    if any(not math.isfinite(v) for v in out) or any(b >= a for a, b in zip(out[:-1], out[1:])):
        raise ValueError(f"{where}: a grid must be strictly decreasing, got {out}")
    return out


@dataclass
class GridTable:
    """Optimized grids per ``(solver, nfe)`` and the metadata of their search.

    Attributes:
        grids: ``(solver, nfe) -> [1.0, ..., 0.0]``.
        meta: everything else in the file (seeds, objective, search settings, ...).
        path: the file it was read from (for error messages), if any.
    """

    grids: Dict[Tuple[str, int], List[float]] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    def has(self, solver: str, nfe: int) -> bool:
        """Whether a grid for ``(solver, nfe)`` is stored."""
        return (solver, int(nfe)) in self.grids

    def grid(
        self, solver: str, nfe: int, dtype: torch.dtype = torch.float64, device: Optional[torch.device | str] = None
    ) -> Tensor:
        """The stored grid as a tensor.

        Raises:
            ValueError: no grid for ``(solver, nfe)``; names the file and what it holds.
        """
        key = (solver, int(nfe))
        if key not in self.grids:
            held = ", ".join(f"{s}@{n}" for s, n in sorted(self.grids)) or "none"
            raise ValueError(
                f"optimized grid file '{self.path}' has no grid for solver '{solver}' at {int(nfe)} NFE "
                f"(it holds: {held}); run `make optimize-grid` for it"
            )
        return torch.tensor(self.grids[key], dtype=dtype, device=device)

    def to_json(self) -> str:
        """The file's text (grids sorted by solver and NFE)."""
        nested: Dict[str, Dict[str, List[float]]] = {}
        for (solver, nfe), values in sorted(self.grids.items()):
            nested.setdefault(solver, {})[str(nfe)] = [float(v) for v in values]
        body = {"format": GRID_FILE_FORMAT, "grids": nested}
        body.update({k: v for k, v in self.meta.items() if k not in body})
        return json.dumps(body, indent=1) + "\n"


def grid_table_from_json(text: str, where: str = "<string>") -> GridTable:
    """Parse and validate a grid file's text.

    Raises:
        ValueError: bad JSON, format, solver, NFE key or grid (each message names ``where``).
    """
    try:
        body = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(body, dict) or body.get("format") != GRID_FILE_FORMAT:
        raise ValueError(f"{where}: expected a JSON object with \"format\": {GRID_FILE_FORMAT}")
    grids: Dict[Tuple[str, int], List[float]] = {}
    nested = body.get("grids")
    if not isinstance(nested, dict):
        raise ValueError(f"{where}: expected \"grids\": {{solver: {{nfe: [1.0, ..., 0.0]}}}}")
    for solver, by_nfe in nested.items():
        if not isinstance(by_nfe, dict):
            raise ValueError(f"{where}: grids.{solver} must map NFE to a grid")
        for key, values in by_nfe.items():
            if not str(key).isdigit():
                raise ValueError(f"{where}: grids.{solver}: NFE key '{key}' is not a positive integer")
            nfe = int(key)
            label = f"{where}: grids.{solver}.{key}"
            grid = check_grid_values(values, label)
            try:
                steps = steps_for_nfe(solver, nfe)
            except ValueError as err:
                raise ValueError(f"{label}: {err}") from None
            if len(grid) != steps + 1:
                raise ValueError(f"{label}: {nfe} NFE of '{solver}' is {steps} steps, so {steps + 1} points, "
                                 f"got {len(grid)}")
            grids[(solver, nfe)] = grid
    meta = {k: v for k, v in body.items() if k not in ("format", "grids")}
    return GridTable(grids=grids, meta=meta)


def load_grid_table(path: str | Path) -> GridTable:
    """Read a grid file.

    Raises:
        FileNotFoundError: the file is missing (the message says how to make it).
        ValueError: the file is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"optimized grid file '{path}' not found; make it with `make optimize-grid` "
            "(or point sampling.grid_file at one)"
        )
    table = grid_table_from_json(path.read_text(), str(path))
    table.path = path
    return table


def save_grid_table(path: str | Path, grids: Mapping[Tuple[str, int], Sequence[float]], meta: Mapping[str, Any]) -> Path:
    """Write grids and metadata atomically (temporary file beside ``path``, then rename).

    Args:
        path: destination ``.json``.
        grids: ``(solver, nfe) -> grid`` (validated before anything is written).
        meta: JSON-serialisable metadata (seeds, objective, search settings, ...).

    Returns:
        ``path``.
    """
    from bafm.io import atomic_write_text

    clean = {(s, int(n)): check_grid_values(g, f"grid {s}@{n}") for (s, n), g in grids.items()}
    text = GridTable(grids=clean, meta=dict(meta)).to_json()
    grid_table_from_json(text, str(path))  # the file must read back
    return atomic_write_text(path, text)
