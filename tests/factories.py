"""Tiny models and synthetic shards for end-to-end tests (seconds on a CPU)."""

from dataclasses import asdict
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from bafm.data.manifest import update_manifest
from bafm.data.shard_writer import ShardWriter
from bafm.models.classifier import DigitsClassifier, save_classifier
from bafm.models.loading import save_backbone, save_sidenet
from bafm.models.sidenet import SideNet
from bafm.models.sit import build_sit


def tiny_digits_models(root: Path) -> Dict[str, Path]:
    """A random tiny SiT (8x8x1, as the embedded default), SideNet and digits classifier under ``root``.

    Both networks start with zeroed outputs (adaLN-Zero, zero output conv); a little noise on
    every weight gives them a non-trivial field, so metrics computed from them are informative.
    """
    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    backbone = build_sit("SiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=1,
                         hidden_size=32, num_heads=2)
    sidenet = SideNet(in_channels=1, channels=16, emb_dim=32, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():
        for p in [*backbone.parameters(), *sidenet.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    save_backbone(backbone, root / "backbone.safetensors")
    save_sidenet(sidenet, root / "sidenet.safetensors")
    save_classifier(DigitsClassifier(channels=(8, 16, 32), image_size=8).eval(), root / "classifier.safetensors")
    return {name: root / f"{name}.safetensors" for name in ("backbone", "sidenet", "classifier")}


def tiny_digits_overrides(tmp_path: Path) -> list:
    """Overrides that point ``experiments/digits.yaml`` at tiny models and ``tmp_path`` folders."""
    paths = tiny_digits_models(tmp_path / "models")
    return [
        f"backbone.path={paths['backbone']}", f"eval.classifier_path={paths['classifier']}",
        f"runs_dir={tmp_path / 'runs'}", f"checkpoints_dir={tmp_path / 'checkpoints'}",
        f"data.root={tmp_path / 'data'}", "backbone.depth=null", "backbone.hidden_size=null",
        "backbone.num_heads=null", "sidenet.channels=8", "sidenet.emb_dim=16", "sidenet.depth=2",
        "sidenet.num_heads=1", "loss.links=2", "data.batch_size=16", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "eval.callback_num_samples=20", "eval.batch_size=20",
        "eval.grid_images=4", "eval.reference_rtol=1e-3", "eval.reference_atol=1e-3",
    ]


def tiny_model_overrides(
    tiny: Path, tmp_path: Path, sidenet: Path | None = None, *, with_sidenet: bool = True
) -> list:
    """Overrides that point ``experiments/digits.yaml`` at the ``tiny`` fixture's models and ``tmp_path`` folders.

    ``sidenet``: the SideNet file (default: the tiny one); ``with_sidenet=False`` leaves ``sidenet.path``
    unset, so the experiment's own choice of SideNet applies.
    """
    side = [f"sidenet.path={sidenet or tiny / 'sidenet.safetensors'}"] if with_sidenet else []
    return [
        f"backbone.path={tiny / 'backbone.safetensors'}", "backbone.depth=1", "backbone.hidden_size=32",
        "backbone.num_heads=2", *side, f"eval.classifier_path={tiny / 'classifier.safetensors'}",
        f"data.root={tmp_path / 'data'}", f"runs_dir={tmp_path / 'runs'}",
        f"checkpoints_dir={tmp_path / 'checkpoints'}",
    ]


def synthetic_shards(folder: Path, shape=(4, 8, 8), n: int = 64, num_classes: int = 10, per_shard: int = 32,
                     scaling_factor: float = 0.18215) -> Path:
    """Random latent moments in ``folder`` as a ``train`` split with its manifest."""
    rng = np.random.default_rng(0)
    c, h, w = shape
    records = []
    for shard, start in enumerate(range(0, n, per_shard)):
        with ShardWriter(folder / f"train-{shard:06d}.tar") as writer:
            for i in range(start, min(start + per_shard, n)):
                mean = rng.standard_normal((c, h, w)).astype(np.float16)
                std = np.full((c, h, w), 0.1, np.float16)
                writer.write(f"{i:06d}", np.concatenate([mean, std]), i % num_classes)
            records.append(asdict(writer.commit()))
    common = {"dataset": folder.name, "source": "synthetic", "encoder": {"kind": "synthetic"},
              "scaling_factor": scaling_factor, "dtype": "float16", "moments_shape": [2 * c, h, w],
              "latent_shape": [c, h, w], "has_flip": False, "num_classes": num_classes,
              "class_names": [str(k) for k in range(num_classes)], "preprocessing": {}}
    update_manifest(folder, common, "train", {"count": n, "num_shards": len(records), "shards": records})
    return folder


def random_inception_weights(path: Path, seed: int = 0) -> Path:
    """A randomly initialised torch-fidelity ``inception-v3-compat`` state dict saved at ``path``.

    Stands in for the real weights file (same layout, no download); convolutions use He
    initialisation so that every layer's output still varies with the input.
    """
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    torch.manual_seed(seed)
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    with torch.no_grad():
        for conv in (m for m in net.modules() if isinstance(m, torch.nn.Conv2d)):
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")  # keeps activations alive with depth
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_var.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
