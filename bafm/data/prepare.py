"""``bafm data``: images -> posterior moments -> WebDataset shards, resumable and distributed.

How a split is cut into shards and written is ``bafm.data.shard_job``; the digits are prepared
by ``bafm.data.digits.prepare_digits``, image folders here with an ``AutoencoderKL``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence

import torch

from bafm.data.digits import prepare_digits
from bafm.data.manifest import DataInputError, DataSettingsError, ShardError, written_by_data
from bafm.data.shard_job import MomentBatch, SplitJob, dist_info, write_split
from bafm.io import check_not_tracked

log = logging.getLogger(__name__)


def prepare_folder(cfg: Any, folder: Path, rank: int, world_size: int, barrier: bool,
                   progress: bool = True) -> Optional[Dict[str, Any]]:
    """Encode an ImageNet-style folder into ``data.split`` shards with an ``AutoencoderKL``.

    Each batch is encoded together with its horizontal flip (one VAE call on ``2B`` images);
    moments are stored as float16 mean and std. Uses ``cuda:LOCAL_RANK`` when CUDA is there.

    Returns:
        The manifest if this process wrote it, else None.
    """
    from torch.utils.data import DataLoader, Subset

    from bafm.data.images import ImageFolderDataset, list_images
    from bafm.data.vae import load_autoencoder

    d = cfg.data
    images = list_images(d.image_dir, d.list_file)
    codec = load_autoencoder(d.vae_path)
    if d.resolution % codec.downsample:
        raise ValueError(f"data.resolution={d.resolution} is not a multiple of the VAE's downsampling {codec.downsample}.")
    if abs(codec.vae.config.scaling_factor - d.vae_scaling_factor) > 1e-9:
        log.warning("data.vae_scaling_factor=%g differs from the VAE config's %g; the manifest records %g",
                    d.vae_scaling_factor, codec.vae.config.scaling_factor, d.vae_scaling_factor)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    codec.to(device)
    size = d.resolution // codec.downsample
    common = {
        "dataset": str(d.dataset), "source": "folder", "encoder": codec.describe(),
        "scaling_factor": float(d.vae_scaling_factor), "dtype": "float16",
        "moments_shape": [2 * codec.latent_channels, size, size], "latent_shape": [codec.latent_channels, size, size],
        "has_flip": True, "num_classes": len(images.class_names), "class_names": images.class_names,
        "preprocessing": {"source": "folder", "image_dir": str(Path(d.image_dir).resolve()),
                          "list_file": str(Path(d.list_file).resolve()) if d.list_file else "",
                          "resolution": int(d.resolution), "crop": "adm_center_crop (BOX halving, BICUBIC, center crop)",
                          "range": [-1.0, 1.0], "flip": "horizontal"},
    }
    job = SplitJob(Path(folder), str(d.split), [f"{i:08d}" for i in range(len(images))], list(images.labels),
                   int(d.samples_per_shard), common)
    dataset = ImageFolderDataset(images, int(d.resolution))

    def encode(indices: Sequence[int]) -> Iterator[MomentBatch]:
        loader = DataLoader(Subset(dataset, list(indices)), batch_size=int(d.encode_batch_size),
                            num_workers=int(d.num_workers), pin_memory=device.type == "cuda")
        for x, _, idx in loader:
            x = x.to(device, non_blocking=True)
            mean, std = codec.encode_moments(torch.cat([x, x.flip(-1)]))
            moments = torch.cat([mean, std], dim=1).half().cpu().numpy()  # (2B, 2C, h, w)
            yield idx.numpy(), moments[: len(x)], moments[len(x) :]

    return write_split(job, encode, rank, world_size, barrier, progress)


def run(cfg: Any, out: Optional[str] = None) -> int:
    """``bafm data``: write the shards of ``cfg`` to ``out`` or ``<data.root>/<data.dataset>``.

    Returns:
        0 on success.

    Raises:
        DataInputError: an image, list file, VAE or setting that cannot be used (one line).
        DataSettingsError: the folder holds shards written with other settings.
        OutputFolderError: the shards would overwrite files that git tracks.
        FileNotFoundError: a missing folder, list file or VAE.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder = Path(out).absolute() if out else Path(cfg.data.root) / cfg.data.dataset
    check_not_tracked(folder, "bafm data's dataset folder", "pass another --out or data.dataset=",
                      writes=written_by_data)
    rank, world_size, initialised = dist_info()
    try:
        if cfg.data.source == "digits":
            manifest = prepare_digits(cfg.data, cfg.seed, folder, rank, world_size, initialised)
        elif cfg.data.source == "captions":
            from bafm.data.text_prepare import prepare_captions

            manifest = prepare_captions(cfg, folder, rank, world_size, initialised)
        else:
            manifest = prepare_folder(cfg, folder, rank, world_size, initialised)
    except (DataSettingsError, ShardError):
        raise
    except ValueError as err:  # unreadable images, malformed list lines, a VAE that does not fit
        raise DataInputError(str(err)) from None
    if manifest is not None:
        counts = ", ".join(f"{s}: {e['count']} samples in {e['num_shards']} shard(s)" for s, e in manifest["splits"].items())
        print(f"wrote {folder} ({counts}); latent shape {manifest['latent_shape']}, scaling factor {manifest['scaling_factor']}")
    return 0
