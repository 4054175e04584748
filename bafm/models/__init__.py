"""Backbones (SiT family) and the SideNet, with safe checkpoint loading."""

from bafm.models.checkpoint_io import CheckpointError
from bafm.models.layers import count_parameters, drop_labels
from bafm.models.loading import load_backbone, load_sidenet, save_backbone, save_sidenet
from bafm.models.sidenet import SideNet
from bafm.models.sit import SIT_ARCHS, SiT, build_sit

__all__ = [
    "SIT_ARCHS",
    "CheckpointError",
    "SiT",
    "SideNet",
    "build_sit",
    "count_parameters",
    "drop_labels",
    "load_backbone",
    "load_sidenet",
    "save_backbone",
    "save_sidenet",
]
