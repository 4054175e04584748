"""Exact flow-matching velocity of a Gaussian-mixture data distribution (a test backbone).

For the linear interpolant ``x_t = (1 - t) x0 + t eps`` (``eps ~ N(0, I)``) and data
``x0 ~ sum_k w_k N(m_k, diag(s_k^2))``, each component gives, per coordinate, with ``a = 1 - t``:

    x_t | k ~ N(a m_k, var_k),  var_k = a^2 s_k^2 + t^2
    E[x0  | x_t, k] = m_k + a s_k^2 / var_k * (x_t - a m_k)
    E[eps | x_t, k] = t / var_k * (x_t - a m_k)
    v_k = E[eps | x_t, k] - E[x0 | x_t, k] = (t - a s_k^2) / var_k * (x_t - a m_k) - m_k

and ``v(x_t, t) = sum_k P(k | x_t) v_k`` with the posterior ``P(k | x_t)`` of the Gaussians
``N(a m_k, var_k)``. No ``1/t`` appears, so ``t = 0`` (``v = -x``) and ``t = 1``
(``v = x - E[x0]``) are exact. Classes are subsets of components; the null class (id
``num_classes``) uses all of them.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn


class GaussianMixtureFlow(nn.Module):
    """Analytic flow-matching "backbone" for a class-conditional Gaussian mixture.

    Args:
        means: component means ``(K, *data_shape)``, data shape ``(D,)`` or ``(C, H, W)`` etc.
        stds: component stds: a float, ``(K,)`` (isotropic) or ``(K, *data_shape)`` (diagonal);
            all > 0.
        weights: mixture weights ``(K,)`` (normalised here; within a class they are
            renormalised over the class's components); None: uniform.
        class_components: for each class, the component indices it uses; None: unconditional
            (``num_classes = 0``, only the null label 0).
        oracle_substeps: RK4 substeps per unit time of ``transport`` for multi-component classes.
    """

    velocity_kind = "backbone"  # velocity(x, t, y), see bafm.models.fast

    def __init__(
        self,
        means: Tensor,
        stds: Union[float, Tensor],
        weights: Optional[Tensor] = None,
        class_components: Optional[Sequence[Sequence[int]]] = None,
        oracle_substeps: int = 256,
    ) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() < 2:
            raise ValueError(f"means must be (K, *data_shape), got shape {tuple(means.shape)}")
        k = means.shape[0]
        self.data_shape: Tuple[int, ...] = tuple(means.shape[1:])
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.dim() == 0 or stds.shape == (k,):
            stds = stds.reshape(-1, *([1] * len(self.data_shape))).expand_as(means)
        if stds.shape != means.shape or not bool((stds > 0).all()):
            raise ValueError(
                f"stds must be > 0 and a float, (K,) = ({k},) or {tuple(means.shape)}, "
                f"got shape {tuple(stds.shape)}"
            )
        weights = torch.ones(k) if weights is None else torch.as_tensor(weights)
        weights = weights.to(torch.float64)
        if weights.shape != (k,) or not bool((weights > 0).all()):
            raise ValueError(f"weights must be ({k},) and > 0, got {weights.tolist()}")
        groups = [list(range(k))] if class_components is None else [list(g) for g in class_components]
        if any(not g or any(not 0 <= c < k for c in g) for g in groups):
            raise ValueError(f"class_components must be non-empty lists of indices in [0, {k}), got {groups}")
        self.num_classes = 0 if class_components is None else len(groups)
        self.null_class = self.num_classes
        allowed = torch.zeros(self.num_classes + 1, k, dtype=torch.bool)
        for label, group in enumerate(groups[: self.num_classes]):
            allowed[label, group] = True
        allowed[self.null_class] = True
        if oracle_substeps < 1:
            raise ValueError(f"oracle_substeps must be >= 1, got {oracle_substeps}")
        self.oracle_substeps = int(oracle_substeps)
        self.register_buffer("means", means.reshape(k, -1).clone())  # (K, D)
        self.register_buffer("variances", stds.reshape(k, -1).square())  # (K, D)
        self.register_buffer("log_weights", (weights / weights.sum()).log())  # (K,)
        self.register_buffer("allowed", allowed)  # (num_classes + 1, K)

    @classmethod
    def random(
        cls,
        data_shape: Sequence[int],
        num_classes: int = 2,
        components_per_class: int = 2,
        std: float = 0.5,
        spread: float = 1.0,
        generator: Optional[torch.Generator] = None,
    ) -> "GaussianMixtureFlow":
        """A mixture with ``N(0, spread^2)`` means, isotropic ``std`` and random weights.

        Class ``c`` owns components ``c * components_per_class ... (c + 1) * components_per_class - 1``.
        """
        k = num_classes * components_per_class
        means = spread * torch.randn(k, *data_shape, generator=generator, dtype=torch.float64)
        weights = 0.5 + torch.rand(k, generator=generator, dtype=torch.float64)
        per = components_per_class
        groups = [list(range(c * per, (c + 1) * per)) for c in range(num_classes)]
        return cls(means, std, weights, groups)

    def _labels(self, y: Optional[Union[int, Tensor]], batch: int, device: torch.device) -> Tensor:
        if y is None:
            return torch.full((batch,), self.null_class, dtype=torch.int64, device=device)
        y = torch.as_tensor(y, dtype=torch.int64, device=device)
        y = y.expand(batch) if y.dim() == 0 else y
        if y.shape != (batch,) or bool(((y < 0) | (y > self.null_class)).any()):
            raise ValueError(
                f"labels must be ints in [0, {self.null_class}] (null = {self.null_class}) "
                f"of shape ({batch},), got {y.tolist()}"
            )
        return y

    def _components(self, x: Tensor, t: Tensor, y: Optional[Union[int, Tensor]]) -> Tuple[Tensor, ...]:
        """Posterior ``(B, K)``, ``x_t - a m`` ``(B, K, D)``, variances ``(B, K, D)``, ``a``, ``t``."""
        batch = x.shape[0]
        if x.shape[1:] != self.data_shape:
            raise ValueError(f"x must be (B, {self.data_shape}), got {tuple(x.shape)}")
        means = self.means.to(x.dtype)[None]  # (1, K, D)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(batch)[:, None, None]  # (B, 1, 1)
        a = 1.0 - t
        var = a.square() * self.variances.to(x.dtype)[None] + t.square()  # (B, K, D)
        resid = x.reshape(batch, 1, -1) - a * means  # (B, K, D)
        log_p = self.log_weights.to(x.dtype) - 0.5 * (resid.square() / var + var.log()).sum(-1)  # (B, K)
        allowed = self.allowed[self._labels(y, batch, x.device)]  # (B, K)
        post = log_p.masked_fill(~allowed, float("-inf")).softmax(-1)
        return post, resid, var, a, t

    def velocity(self, x: Tensor, t: Tensor, y: Optional[Union[int, Tensor]] = None) -> Tensor:
        """Exact velocity ``E[eps - x0 | x_t = x]``.

        Args:
            x: states ``(B, *data_shape)``.
            t: times ``(B,)`` (or a scalar) in ``[0, 1]``.
            y: labels ``(B,)`` or an int, null class = ``num_classes``; None: null.

        Returns:
            ``(B, *data_shape)`` velocity in ``x``'s dtype.
        """
        post, resid, var, a, t = self._components(x, t, y)
        coef = (t - a * self.variances.to(x.dtype)[None]) / var  # (B, K, D)
        v_k = coef * resid - self.means.to(x.dtype)[None]  # (B, K, D)
        return torch.einsum("bk,bkd->bd", post, v_k).reshape(x.shape)

    def forward(self, x: Tensor, t: Tensor, y: Optional[Union[int, Tensor]] = None) -> Tensor:
        """Same as ``velocity``."""
        return self.velocity(x, t, y)

    def expected_data(self, x: Tensor, t: Tensor, y: Optional[Union[int, Tensor]] = None) -> Tensor:
        """Posterior mean ``E[x0 | x_t = x]`` ``(B, *data_shape)``; arguments as ``velocity``."""
        post, resid, var, a, _ = self._components(x, t, y)
        x0_k = self.means.to(x.dtype)[None] + a * self.variances.to(x.dtype)[None] / var * resid
        return torch.einsum("bk,bkd->bd", post, x0_k).reshape(x.shape)

    def sample_data(
        self, n: int, y: Optional[Union[int, Tensor]] = None, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Draw ``n`` data points ``x0`` (float64, on the module's device).

        Args:
            n: number of samples.
            y: labels ``(n,)`` or an int; None: the null class (whole mixture).
            generator: random generator on the module's device.

        Returns:
            ``(n, *data_shape)`` samples.
        """
        device = self.means.device
        labels = self._labels(y, n, device)
        probs = self.log_weights.exp()[None].expand(n, -1) * self.allowed[labels]  # (n, K)
        comp = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (n,)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype, device=device)
        return (self.means[comp] + self.variances[comp].sqrt() * noise).reshape(n, *self.data_shape)

    def transport(self, x: Tensor, t: Tensor, s: Tensor, y: Optional[Union[int, Tensor]] = None) -> Tensor:
        """Move states along the exact ODE trajectories from time ``t`` to time ``s`` (per sample).

        When every label selects a single component the map is closed form: the standardised
        coordinate ``z = (x_t - (1 - t) m) / sqrt((1 - t)^2 s^2 + t^2)`` is constant along a
        trajectory. Otherwise the exact field is integrated with classic RK4, ``oracle_substeps``
        substeps per unit of time (at least one).

        Args:
            x: states ``(B, *data_shape)`` at ``t``.
            t: start times ``(B,)`` in ``[0, 1]``.
            s: end times ``(B,)`` in ``[0, 1]``.
            y: labels as in ``velocity``.

        Returns:
            ``(B, *data_shape)`` states at ``s``.
        """
        batch = x.shape[0]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(batch)
        s = torch.as_tensor(s, dtype=x.dtype, device=x.device).expand(batch)
        allowed = self.allowed[self._labels(y, batch, x.device)]  # (B, K)
        if bool((allowed.sum(-1) == 1).all()):
            comp = allowed.to(torch.int64).argmax(-1)  # (B,)
            means, var = self.means[comp].to(x.dtype), self.variances[comp].to(x.dtype)  # (B, D)
            t, s = t[:, None], s[:, None]
            z = (x.reshape(batch, -1) - (1.0 - t) * means) / ((1.0 - t).square() * var + t.square()).sqrt()
            x_s = (1.0 - s) * means + ((1.0 - s).square() * var + s.square()).sqrt() * z
            return x_s.reshape(x.shape)
        n = max(1, math.ceil(float((s - t).abs().max()) * self.oracle_substeps))
        dt_vec = (s - t) / n  # signed substep (B,)
        dt = dt_vec.view(-1, *([1] * (x.dim() - 1)))
        for j in range(n):
            tau = t + j * dt_vec
            k1 = self.velocity(x, tau, y)
            k2 = self.velocity(x + 0.5 * dt * k1, tau + 0.5 * dt_vec, y)
            k3 = self.velocity(x + 0.5 * dt * k2, tau + 0.5 * dt_vec, y)
            k4 = self.velocity(x + dt * k3, tau + dt_vec, y)
            x = x + dt / 6.0 * (k1 + 2.0 * (k2 + k3) + k4)
        return x

    def side_velocity(
        self, x: Tensor, v: Tensor, t: Tensor, h: Tensor, y: Optional[Union[int, Tensor]] = None
    ) -> Tensor:
        """Oracle SideNet: the exact velocity at ``t - h`` on the ODE trajectory through ``(x, t)``.

        ``v`` is not used (the trajectory is fixed by ``x``); it is accepted for the SideNet
        signature ``sidenet.velocity(x, v, t, h, y)``.

        Args:
            x: states ``(B, *data_shape)`` at ``t``.
            v: velocities at ``(x, t)`` ``(B, *data_shape)`` (unused).
            t: times ``(B,)`` in ``[0, 1]``.
            h: offsets ``(B,)``; ``t - h`` must lie in ``[0, 1]``.
            y: labels as in ``velocity``.

        Returns:
            ``(B, *data_shape)`` velocity at ``t - h``.
        """
        del v
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        node = t - torch.as_tensor(h, dtype=x.dtype, device=x.device)
        return self.velocity(self.transport(x, t, node, y), node, y)
