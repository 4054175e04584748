"""Image editing by inversion: data -> noise under one class, noise -> data under another."""

from bafm.editing.inversion import EditLatents, edit_latents

__all__ = ["EditLatents", "edit_latents"]
