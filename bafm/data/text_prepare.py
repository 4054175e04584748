"""``bafm data`` for image-caption pairs: SD3/Flux latents and prompt embeddings in shards.

Each sample holds the pipeline VAE's posterior moments (float16 ``(2C, H, W)``, unscaled, as the
ImageNet path stores them), the prompt embeddings of its caption from the pipeline's own
``encode_prompt`` (``prompt_embeds.npy`` float16 ``(L, D)``, ``pooled.npy`` float16 ``(P,)``),
the caption itself (``txt``) and class 0. The manifest records the VAE's scaling and shift
factors (latents are ``(z - shift) * scale`` at load time, as the pipelines do) and the shapes
of the extra arrays. The unconditional encoding (the empty prompt, which is what both pipelines
feed their unconditional branch by default) is stored once per dataset in
``null_condition.safetensors``; training swaps it in for conditioning dropout.

Sharding, resuming, checksums and the manifest are the ImageNet path's (``bafm.data.shard_job``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset

from bafm.data.captions import CaptionList, list_caption_pairs
from bafm.data.images import load_image
from bafm.data.npy_codec import encode_npy
from bafm.data.shard_job import SplitJob, write_split
from bafm.data.text_encoding import encode_prompts, load_text_pipeline
from bafm.data.vae import AutoencoderKLCodec
from bafm.io import atomic_path
from bafm.models.text_condition import TextCondition

NULL_CONDITION = "null_condition.safetensors"
PROMPT_EMBEDS, POOLED, CAPTION = "prompt_embeds.npy", "pooled.npy", "txt"


class CaptionImageDataset(Dataset):
    """Center-cropped images of a ``CaptionList``: items ``(image (3, S, S) in [-1, 1], index)``."""

    def __init__(self, pairs: CaptionList, image_size: int) -> None:
        self.pairs, self.image_size = pairs, image_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return load_image(self.pairs.root / self.pairs.paths[index], self.image_size), index


def write_null_condition(folder: Path, null: TextCondition) -> Path:
    """Store the unconditional encoding (batch 1, float16) as ``<folder>/null_condition.safetensors``, atomically."""
    path = Path(folder) / NULL_CONDITION
    tensors = {"prompt_embeds": null.prompt_embeds.detach().to("cpu", torch.float16).contiguous(),
               "pooled": null.pooled.detach().to("cpu", torch.float16).contiguous()}  # fmt: skip
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return path


def load_null_condition(folder: str | Path) -> TextCondition:
    """The dataset's unconditional encoding: ``TextCondition`` of batch 1, float16.

    Raises:
        FileNotFoundError: the dataset has none (it was not written by ``bafm data`` from captions).
    """
    path = Path(folder) / NULL_CONDITION
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' not found: text-to-image shards are written by `bafm data` "
                                "with data.source=captions, which stores the empty prompt's encoding there")
    tensors = load_file(str(path))
    return TextCondition(tensors["prompt_embeds"], tensors["pooled"])


def _device() -> torch.device:
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")


def prepare_captions(cfg: Any, folder: Path, rank: int, world_size: int, barrier: bool,
                     progress: bool = True) -> Optional[Dict[str, Any]]:
    """Encode image-caption pairs into ``data.split`` shards with the pipeline of ``backbone.path``.

    Returns:
        The manifest if this process wrote it, else None.

    Raises:
        FileNotFoundError / ValueError: missing pairs or pipeline, a resolution the VAE cannot take.
    """
    d, family = cfg.data, str(cfg.backbone.source)
    pairs = list_caption_pairs(d.image_dir, d.captions_file)
    device = _device()
    text_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = load_text_pipeline(cfg.backbone.path, family, device=device, text_dtype=text_dtype)
    codec = AutoencoderKLCodec(pipe.vae, source=str(cfg.backbone.path))
    if d.resolution % codec.downsample:
        raise ValueError(f"data.resolution={d.resolution} is not a multiple of the VAE's downsampling {codec.downsample}.")
    length = int(d.max_sequence_length)
    null = encode_prompts(pipe, [""], length, device)
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_null_condition(folder, null)
    size = d.resolution // codec.downsample
    vae_cfg = pipe.vae.config
    common = {
        "dataset": str(d.dataset), "source": "captions", "encoder": codec.describe(),
        "scaling_factor": float(vae_cfg.scaling_factor), "shift_factor": float(vae_cfg.shift_factor or 0.0),
        "dtype": "float16", "moments_shape": [2 * codec.latent_channels, size, size],
        "latent_shape": [codec.latent_channels, size, size], "has_flip": False,
        "num_classes": 1, "class_names": ["caption"],
        "extra_arrays": {PROMPT_EMBEDS: list(null.prompt_embeds.shape[1:]), POOLED: list(null.pooled.shape[1:])},
        "text": {"pipeline": str(cfg.backbone.path), "family": family, "max_sequence_length": length,
                 "null_condition": NULL_CONDITION, "null_prompt": ""},
        "preprocessing": {"source": "captions", "image_dir": str(Path(d.image_dir).resolve()) if d.image_dir else "",
                          "captions_file": str(Path(d.captions_file).resolve()) if d.captions_file else "",
                          "resolution": int(d.resolution), "crop": "adm_center_crop (BOX halving, BICUBIC, center crop)",
                          "range": [-1.0, 1.0], "flip": "none (captions may name sides)"},
    }
    job = SplitJob(Path(folder), str(d.split), [f"{i:08d}" for i in range(len(pairs))], [0] * len(pairs),
                   int(d.samples_per_shard), common)
    dataset = CaptionImageDataset(pairs, int(d.resolution))

    def encode(indices: Sequence[int]) -> Iterator[Tuple[np.ndarray, np.ndarray, None, List[Dict[str, bytes]]]]:
        loader = DataLoader(Subset(dataset, list(indices)), batch_size=int(d.encode_batch_size),
                            num_workers=int(d.num_workers), pin_memory=device.type == "cuda")
        for x, idx in loader:
            mean, std = codec.encode_moments(x.to(device, non_blocking=True))
            moments = torch.cat([mean, std], dim=1).half().cpu().numpy()  # (B, 2C, h, w)
            captions = [pairs.captions[i] for i in idx.tolist()]
            cond = encode_prompts(pipe, captions, length, device)
            embeds = cond.prompt_embeds.to(torch.float16).cpu().numpy()  # (B, L, D)
            pooled = cond.pooled.to(torch.float16).cpu().numpy()  # (B, P)
            extras = [{PROMPT_EMBEDS: encode_npy(embeds[j]), POOLED: encode_npy(pooled[j]),
                       CAPTION: captions[j].encode("utf-8")} for j in range(len(captions))]  # fmt: skip
            yield idx.numpy(), moments, None, extras

    return write_split(job, encode, rank, world_size, barrier, progress)


def bytes_per_sample(latent_shape: Sequence[int], tokens: int, token_dim: int, pooled_dim: int) -> int:
    """Payload bytes of one text-to-image sample (float16 moments, prompt embeddings, pooled).

    Counted from shapes and dtypes: ``2 * (2 C H W + L D + P)``; tar headers and padding (up to
    1 KiB for each of the 5 members), ``.npy`` headers (128 bytes each) and the caption come on top.
    """
    c, h, w = latent_shape
    return 2 * (2 * c * h * w + tokens * token_dim + pooled_dim)
