"""Image editing by inversion: data -> noise under one class, noise -> data under another."""

from bafm.editing.inversion import (
    EditLatents,
    edit_latents,
    generate,
    invert,
    is_adaptive,
    solve_grid,
    steps_for_budget,
)

__all__ = ["EditLatents", "edit_latents", "generate", "invert", "is_adaptive", "solve_grid", "steps_for_budget"]
