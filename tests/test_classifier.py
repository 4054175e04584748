"""Digits classifier: architecture, safetensors + JSON round trip, augmentation, training, shipped weights."""

import json

import pytest
import torch

from bafm.config import load_config
from bafm.eval.features import ClassifierFeatures
from bafm.models.classifier import DigitsClassifier, load_classifier, save_classifier, sidecar_path
from bafm.training.classifier_train import BACKGROUND, accuracy, random_shift, train_classifier

SHIPPED = "checkpoints/digits/classifier.safetensors"


def test_shapes_and_feature_logit_consistency():
    model = DigitsClassifier().eval()
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    feats = model.features(x)
    assert feats.shape == (5, 128) and model.feature_dim == 128
    torch.testing.assert_close(model(x), model.head(feats))
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\)"):
        model(torch.zeros(2, 3, 16, 16))
    # The eval wrapper sees [0, 1] images and maps them back to [-1, 1].
    f, logits = ClassifierFeatures(model)((x + 1) / 2)
    torch.testing.assert_close(f, feats, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DigitsClassifier(channels=(8, 16, 24)).eval()
    model.body[0][1].running_mean.fill_(0.3)  # buffers travel too
    path = save_classifier(model, tmp_path / "cls.safetensors", {"val_accuracy": 0.5})
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["val_accuracy"] == 0.5 and meta["channels"] == [8, 16, 24] and meta["arch"] == "digits-cnn"
    loaded = load_classifier(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp"))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.safetensors.*make backbone"):
        load_classifier(tmp_path / "nothere.safetensors")
    path = save_classifier(DigitsClassifier(), tmp_path / "c.safetensors")
    sidecar_path(path).write_text(json.dumps({"arch": "resnet"}))
    with pytest.raises(ValueError, match="'arch' is 'resnet'"):
        load_classifier(path)


def test_random_shift_translates_with_background_fill():
    x = torch.full((64, 1, 16, 16), BACKGROUND)
    x[:, 0, 7, 8] = 1.0  # one bright pixel, away from the border
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    rows, cols = (out[:, 0] == 1.0).nonzero(as_tuple=True)[1:]
    assert rows.shape == (64,)  # exactly one bright pixel survives in each image
    assert set((rows - 7).tolist()) == {-2, -1, 0, 1, 2} and set((cols - 8).tolist()) == {-2, -1, 0, 1, 2}
    assert int((out == BACKGROUND).sum()) == 64 * (256 - 1)
    torch.testing.assert_close(random_shift(x, 0, torch.Generator()), x)


def test_train_classifier_short_run_writes_files(tmp_path):
    cfg = load_config("experiments/digits.yaml", ["backbone_train.classifier_steps=40", "backbone_train.batch_size=64"])
    out = tmp_path / "cls.safetensors"
    model, metrics = train_classifier(cfg, out=out, log_every=0)
    assert set(metrics) >= {"val_accuracy", "train_accuracy", "steps", "seconds", "num_params", "n_train", "n_val"}
    assert metrics["n_train"] + metrics["n_val"] == 1797 and metrics["steps"] == 40
    assert metrics["val_accuracy"] > 0.5  # 10 classes: chance is 0.1
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["val_accuracy"] == metrics["val_accuracy"]
    torch.testing.assert_close(load_classifier(out)(torch.zeros(1, 1, 8, 8)), model(torch.zeros(1, 1, 8, 8)))


def test_shipped_classifier_is_accurate_and_small(repo_root):
    path = repo_root / SHIPPED
    if not path.is_file():
        pytest.skip("digits classifier not trained yet (make backbone)")
    assert path.stat().st_size < 1_000_000
    cfg = load_config(str(repo_root / "experiments/digits.yaml"))
    from bafm.data.digits import digits_options, load_digits_images

    images, labels = load_digits_images("val", **digits_options(cfg.data, cfg.seed))
    acc = accuracy(load_classifier(path), images, labels)
    assert acc > 0.97
    assert json.loads(sidecar_path(path).read_text())["val_accuracy"] == pytest.approx(acc, abs=1e-9)


def test_augmentation_shift_comes_from_the_config():
    cfg = load_config("experiments/digits.yaml", ["backbone_train.classifier_steps=5", "backbone_train.batch_size=32",
                                                  "backbone_train.classifier_max_shift=1"])
    from_config, metrics = train_classifier(cfg, save=False, log_every=0)
    explicit, _ = train_classifier(cfg, max_shift=1, save=False, log_every=0)
    unshifted, _ = train_classifier(cfg, max_shift=0, save=False, log_every=0)
    assert metrics["max_shift"] == 1
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # native 8x8 digits
    torch.testing.assert_close(from_config(x), explicit(x), rtol=0, atol=0)
    assert not torch.allclose(from_config(x), unshifted(x))
