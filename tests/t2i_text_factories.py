"""Tiny SD3 / Flux pipelines WITH text encoders and tokenizers, built locally (no network).

CLIP tokenizers are byte-pair tokenizers over a character vocabulary (no merges), the T5
tokenizer a unigram model over a few words and characters; the encoders are two-layer
transformers sized for the tiny transformers of ``t2i_factories`` (SD3: two CLIP encoders of
width 16 with projections to 32, pooled 64, T5 width 32; Flux: CLIP width 32, T5 width 32).
``save_pipeline`` writes a ``save_pretrained`` folder that ``from_pretrained`` reads offline.
"""

from pathlib import Path
from typing import Any, List

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from t2i_factories import tiny_flux_pipeline, tiny_sd3_pipeline

WORDS = "a photo of the cat dog red blue green small big on in with".split()
CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz"))


def clip_tokenizer() -> CLIPTokenizer:
    """Character-level CLIP BPE tokenizer (77 tokens, like CLIP's)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """Unigram T5 tokenizer over a few words, falling back to characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    pieces += [(c, -3.0) for c in CHARS] + [("\u2581", -2.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip(hidden: int, projection: int, seed: int, with_projection: bool) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(clip_tokenizer()), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, projection_dim=projection,
                            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)
    return model.eval()


def _t5(width: int, seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(t5_tokenizer()), d_model=width, d_ff=2 * width, d_kv=8, num_layers=1,
                      num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0)
    return T5EncoderModel(config).eval()


def sd3_pipeline_with_text(seed: int = 0) -> Any:
    """The tiny SD3 pipeline (pooled 64, text width 32) with its three text encoders."""
    pipe = tiny_sd3_pipeline(seed)
    pipe.register_modules(text_encoder=_clip(16, 32, seed + 1, True), tokenizer=clip_tokenizer(),
                          text_encoder_2=_clip(16, 32, seed + 2, True), tokenizer_2=clip_tokenizer(),
                          text_encoder_3=_t5(32, seed + 3), tokenizer_3=t5_tokenizer())  # fmt: skip
    return pipe


def flux_pipeline_with_text(seed: int = 0, guidance_embeds: bool = False) -> Any:
    """The tiny Flux pipeline (pooled 32, text width 32) with its CLIP and T5 encoders."""
    pipe = tiny_flux_pipeline(seed, guidance_embeds)
    pipe.register_modules(text_encoder=_clip(32, 32, seed + 1, False), tokenizer=clip_tokenizer(),
                          text_encoder_2=_t5(32, seed + 2), tokenizer_2=t5_tokenizer())  # fmt: skip
    return pipe


def save_pipeline(pipe: Any, folder: Path) -> Path:
    """``save_pretrained`` into ``folder`` (safetensors), returned for ``backbone.path``."""
    pipe.save_pretrained(str(folder))
    return Path(folder)


def write_caption_pairs(folder: Path, captions: List[str], size: int = 16, seed: int = 0) -> Path:
    """Random RGB PNGs with same-stem ``.txt`` captions in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, caption in enumerate(captions):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(caption + "\n")
    return folder


PIPELINES = {"sd3": sd3_pipeline_with_text, "flux": flux_pipeline_with_text}
EXPERIMENTS = {"sd3": "experiments/sd3_medium.yaml", "flux": "experiments/flux1_dev.yaml"}


def tiny_text_overrides(root: Path, family: str, pipeline_dir: Path, images: Path) -> List[str]:
    """Overrides that point an SD3/Flux experiment file at tiny local models and data on the CPU."""
    return [f"backbone.path={pipeline_dir}", f"data.image_dir={images}", "data.captions_file=''",
            f"data.root={root / 'data'}", "data.resolution=8", "data.max_sequence_length=6",
            "data.samples_per_shard=2", "data.encode_batch_size=4", "data.batch_size=2", "data.num_workers=0",
            "data.shuffle_buffer=4", f"runs_dir={root / 'runs'}", f"checkpoints_dir={root / 'checkpoints'}",
            "sidenet.channels=8", "sidenet.emb_dim=8", "sidenet.depth=2", "sidenet.num_heads=2",
            "sidenet.channels_last=false", "loss.links=2", "trainer.accelerator=cpu", "trainer.precision=32-true",
            "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=1",
            "trainer.enable_progress_bar=false", "sample.height=16", "sample.width=16", "sample.max_sequence_length=6"]


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny ``CLIPModel`` with its ``CLIPProcessor`` (16-pixel images) saved for ``eval.clip_model``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    text = dict(vocab_size=len(clip_tokenizer()), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                 crop_size={"height": 16, "width": 16}),
                              tokenizer=clip_tokenizer())
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return Path(folder)
