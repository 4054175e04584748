"""SideNetModule: frozen backbone, trainable SideNet, exact resume, and a SideNet that helps."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bafm.models.analytic import GaussianMixtureFlow
from bafm.models.guidance import build_sampling_fns
from bafm.models.sidenet import SideNet
from bafm.solvers import get_solver
from bafm.solvers.grids import uniform_grid
from bafm.training.ba_loss import ChainLossConfig
from bafm.training.module import BACKBONE_PREFIX, SideNetModule
from bafm.data.resumable import ResumableLoader


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def make_flow():
    flow = GaussianMixtureFlow.random((1, 8, 8), num_classes=3, components_per_class=1, std=0.3,
                                      spread=1.0, generator=torch.Generator().manual_seed(0))
    return flow.float()


def make_loader(flow, n=256, batch_size=32, seed=0):
    """Shuffled batches, reshuffled per epoch from the epoch number: resumable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, flow.num_classes, (n,), generator=g)
    x0 = flow.sample_data(n, y, generator=g).float()

    def collate(items):
        xs, ys = zip(*items)
        return {"latent": torch.stack(xs), "cls": torch.stack(ys)}

    def make_epoch(epoch):
        order = torch.Generator().manual_seed(seed * 1000 + epoch)
        return DataLoader(TensorDataset(x0, y), batch_size=batch_size, shuffle=True, generator=order,
                          collate_fn=collate)

    return ResumableLoader(make_epoch, length=n // batch_size)


def make_module(flow, seed=0, links=2, lr=3e-3):
    torch.manual_seed(seed)
    sidenet = SideNet(in_channels=1, channels=16, emb_dim=32, depth=2, num_heads=1, num_classes=flow.num_classes)
    return SideNetModule(flow, sidenet, num_classes=flow.num_classes,
                         loss=ChainLossConfig(links=links, offset_rate=20.0, p_backward=0.5),
                         label_dropout=0.1, lr=lr, ema_decay=0.9, seed=seed)


def make_trainer(max_steps, callbacks=(), **kwargs):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     callbacks=list(callbacks), **kwargs)


def test_backbone_frozen_only_sidenet_optimised_and_not_checkpointed(tmp_path):
    flow = make_flow()
    flow.register_parameter("unused_weight", torch.nn.Parameter(torch.ones(3)))  # something to freeze
    module = make_module(flow)
    trainer = make_trainer(3, enable_checkpointing=False)
    trainer.fit(module, make_loader(flow, n=96))
    assert [name for name, p in module.backbone.named_parameters() if p.requires_grad] == []
    assert not module.backbone.training
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.sidenet.parameters()}
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    # Exactly the SideNet and its EMA copy (weights, buffers, update count), no backbone key.
    expected = {f"sidenet.{k}" for k in module.sidenet.state_dict()} | {f"ema.{k}" for k in module.ema.state_dict()}
    assert set(state) == expected
    assert not [k for k in state if k.startswith(BACKBONE_PREFIX)]


def test_resume_continues_exactly(tmp_path):
    flow = make_flow()
    full = LossRecorder()
    make_trainer(8, [full], enable_checkpointing=False).fit(make_module(flow), make_loader(flow, n=128))

    for stop in (3, 4):  # mid-epoch and at the end of an epoch (4 batches per epoch)
        first = LossRecorder()
        trainer = make_trainer(stop, [first], enable_checkpointing=False)
        trainer.fit(make_module(flow), make_loader(flow, n=128))
        ckpt = tmp_path / f"stop{stop}.ckpt"
        trainer.save_checkpoint(ckpt)
        second = LossRecorder()
        make_trainer(8, [second], enable_checkpointing=False).fit(make_module(flow), make_loader(flow, n=128),
                                                                  ckpt_path=str(ckpt))
        assert first.losses + second.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-9), stop


def test_non_finite_loss_stops_with_the_step():
    flow = make_flow()
    module = make_module(flow)
    with torch.no_grad():
        module.sidenet.output_conv.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="at step 0"):
        make_trainer(2, enable_checkpointing=False).fit(module, make_loader(flow, n=64))


def _trajectory_error(flow, solver, steps, side_velocity=None):
    g = torch.Generator().manual_seed(123)
    y = torch.arange(64) % flow.num_classes
    noise = torch.randn(64, 1, 8, 8, generator=g)
    exact = flow.transport(noise.double(), torch.ones(64), torch.zeros(64), y).float()
    velocity_fn, side_fn = build_sampling_fns(flow.velocity, y, null_class=flow.null_class,
                                              side_velocity=side_velocity)
    kwargs = {"side_fn": side_fn} if side_fn is not None else {}
    out = get_solver(solver)(velocity_fn, noise, uniform_grid(steps), **kwargs)
    return float((out.x - exact).pow(2).mean().sqrt())


def test_trained_sidenet_beats_euler_and_the_untrained_sidenet():
    flow = make_flow()
    module = make_module(flow, links=3, lr=3e-3)
    recorder = LossRecorder()
    make_trainer(300, [recorder], enable_checkpointing=False).fit(module, make_loader(flow, n=512, batch_size=64))
    early, late = sum(recorder.losses[:20]) / 20, sum(recorder.losses[-20:]) / 20
    assert late < 0.5 * early, (early, late)

    sidenet = module.ema_sidenet.eval()
    with torch.no_grad():
        trained = _trajectory_error(flow, "ba", 4, sidenet.velocity)
        untrained = _trajectory_error(flow, "ba", 4, lambda x, v, t, h, y: v)
        euler = _trajectory_error(flow, "euler", 4)
    assert trained < 0.5 * untrained, (trained, untrained)
    assert trained < 0.25 * euler, (trained, euler)
