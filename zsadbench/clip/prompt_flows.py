"""Prompt distributions with normalizing flows (Bayes-PFL's prompt flow module), as composable pieces.

A prompt distribution turns an input vector x (a CLIP image embedding, or a learned "state" vector) into a Gaussian
q(z_0 | x) = N(mu(x), s(x)) over the prompt space, draws z_0 by reparameterisation and pushes it through K planar
flows z_k = z_{k-1} + u_k tanh(w_k · z_{k-1} + b_k) (Rezende & Mohamed 2015), collecting log |det dz_k / dz_{k-1}|.

- :class:`GaussianEncoder` gives (mu, s): two three-layer Softplus MLPs, the second predicting a log-variance lv,
  ``s = exp(lv / 2)``. As in xiaozhen228/Bayes-PFL, ``s`` is then used as the *variance*: samples are
  ``mu + eps * sqrt(s)`` and the density uses ``log s`` (consistent with each other, so the flow is a valid one).
- :class:`ImageSpecificFlow` (the reference's ``PlanarPFL``): the flow parameters u, w, b are amortised from x by
  linear layers, so every image gets its own flow.
- :class:`ImageAgnosticFlow` (``PlanarPFL_state``): x is a learned ``state`` vector and u, w, b are free parameters,
  one flow shared by all images.
- :func:`flow_kl_divergence`: the Monte-Carlo KL term of the flow ELBO, ``[Σ (log q(z_0) - log p(z_K)) - Σ log det]``
  divided by a batch size, with p = N(0, I) (the reference's ``binary_loss_function``, its reconstruction part unused,
  its broadcast of a single draw over the batch kept).

Randomness is explicit: every sampling function takes the standard-normal draws ``eps`` as an argument, so callers
decide where they come from (a seeded generator at inference, the global RNG during training, recorded draws in the
parity check). Parameter names follow the reference's state-dict keys (``weight_mean.module.0``, ``amor_u``,
``state``, ``p_mu``) so the authors' checkpoints map onto these modules one to one. The decoders and ``p_mu`` (the
reconstruction branch the authors abandoned) exist only so that those checkpoints load and round-trip; nothing here
calls them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


class InferenceBlock(nn.Module):
    """Linear, Softplus, Linear, Softplus, Linear (the reference's ``InferenceBlock``; keys ``module.{0,2,4}``)."""

    def __init__(self, input_units: int, hidden_units: int, output_units: int) -> None:
        super().__init__()
        self.module = nn.Sequential(nn.Linear(input_units, hidden_units), nn.Softplus(),
                                    nn.Linear(hidden_units, hidden_units), nn.Softplus(),
                                    nn.Linear(hidden_units, output_units))

    def forward(self, x: Tensor) -> Tensor:
        """Returns the MLP output for (..., input_units) inputs."""
        return self.module(x)


class GaussianEncoder(nn.Module):
    """Maps x to the mean and the (reference-named) variance ``exp(log_variance / 2)`` of q(z_0 | x)."""

    def __init__(self, input_units: int, hidden_units: int, output_units: int) -> None:
        super().__init__()
        self.weight_mean = InferenceBlock(input_units, hidden_units, output_units)
        self.weight_log_variance = InferenceBlock(input_units, hidden_units, output_units)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (mu, s) for (..., input_units) inputs; samples use std ``sqrt(s)`` (see the module docstring)."""
        return self.weight_mean(x), torch.exp(0.5 * self.weight_log_variance(x))


class Decoder(nn.Module):
    """The unused reconstruction decoder (kept for the authors' checkpoint layout only)."""

    def __init__(self, input_units: int, hidden_units: int, output_units: int) -> None:
        super().__init__()
        self.weight_mean = InferenceBlock(input_units, hidden_units, output_units)


def planar_flow(z: Tensor, u: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (z + u tanh(w·z + b), log|1 + tanh'(w·z + b) w·u| + 1e-5 inside the log) for (n, D) ``z``.

    ``u`` (n, D, 1), ``w`` (n, 1, D), ``b`` (n, 1, 1) broadcast per row; no invertibility constraint on u (as the
    reference). The log-det is ``log(|1 + psi·u| + 1e-5)`` exactly as the reference writes it.
    """
    column = z.unsqueeze(2)
    activation = torch.tanh(torch.bmm(w, column) + b)
    moved = (column + u * activation).squeeze(2)
    psi = w * (1 - activation ** 2)
    log_det = torch.log(torch.abs(1 + torch.bmm(psi, u)) + 1e-5).squeeze(2).squeeze(1)
    return moved, log_det


@dataclass
class FlowSample:
    """A draw through a prompt flow: the base sample, the flowed sample and what the KL term needs."""

    z0: Tensor  # (n, D) base draws mu + eps sqrt(s)
    zk: Tensor  # (n, D) after the K flows
    mu: Tensor  # (n, D)
    variance: Tensor  # (n, D) the reference's "var" s
    log_det: Tensor  # (n,) summed log-determinants of the K flows


class _PlanarFlowDistribution(nn.Module):
    """Shared part of the two prompt distributions: encoder, flow length, the unused decoder head ``p_mu``."""

    def __init__(self, encoder: GaussianEncoder, decoder: Decoder, dim: int, num_flows: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.p_mu = nn.Sequential(nn.Linear(dim, dim))  # reconstruction head of the discarded decoder branch
        self.dim, self.num_flows = dim, num_flows

    def flow_parameters(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns u (n, K, D, 1), w (n, K, 1, D), b (n, K, 1, 1) for the encoder inputs ``x``."""
        raise NotImplementedError

    def encoder_input(self, x: Tensor) -> Tensor:
        """Returns what the encoder and the amortised flow parameters read (x itself, or the learned state)."""
        return x

    def sample(self, x: Tensor, eps: Tensor) -> FlowSample:
        """Returns the flowed draws for standard-normal ``eps`` (n, D): one draw per row of the encoder input."""
        source = self.encoder_input(x)
        mu, variance = self.encoder(source)
        u, w, b = self.flow_parameters(source)
        z = eps * variance.sqrt() + mu
        z0, log_det = z, torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for k in range(self.num_flows):
            z, step = planar_flow(z, u[:, k], w[:, k], b[:, k])
            log_det = log_det + step
        return FlowSample(z0, z, mu, variance, log_det)

    def sample_many(self, x: Tensor, eps: Tensor) -> Tensor:
        """Returns (R, n, D) flowed draws for (R, n, D) ``eps``: R Monte-Carlo samples of every row (inference)."""
        return torch.stack([self.sample(x, e).zk for e in eps])


class ImageSpecificFlow(_PlanarFlowDistribution):
    """q(z | image): Gaussian from the image embedding, planar flows amortised from it (the reference's PlanarPFL)."""

    def __init__(self, encoder: GaussianEncoder, decoder: Decoder, dim: int, num_flows: int) -> None:
        super().__init__(encoder, decoder, dim, num_flows)
        self.amor_u = nn.Linear(dim, num_flows * dim)
        self.amor_w = nn.Linear(dim, num_flows * dim)
        self.amor_b = nn.Linear(dim, num_flows)

    def flow_parameters(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns per-image flow parameters computed from the (n, D) embeddings."""
        n = x.shape[0]
        return (self.amor_u(x).view(n, self.num_flows, self.dim, 1),
                self.amor_w(x).view(n, self.num_flows, 1, self.dim), self.amor_b(x).view(n, self.num_flows, 1, 1))


class ImageAgnosticFlow(_PlanarFlowDistribution):
    """q(z): Gaussian from a learned state vector, free planar-flow parameters (the reference's PlanarPFL_state)."""

    def __init__(self, encoder: GaussianEncoder, decoder: Decoder, dim: int, num_flows: int) -> None:
        super().__init__(encoder, decoder, dim, num_flows)
        self.amor_u = nn.Parameter(torch.randn(1, num_flows, dim, 1))
        self.amor_w = nn.Parameter(torch.randn(1, num_flows, 1, dim))
        self.amor_b = nn.Parameter(torch.randn(1, num_flows, 1, 1))
        self.state = nn.Parameter(torch.randn(1, dim))

    def encoder_input(self, x: Tensor) -> Tensor:
        """Returns the learned (1, D) state: the distribution does not depend on the image."""
        del x
        return self.state

    def flow_parameters(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the free flow parameters (shared by every draw)."""
        del x
        return self.amor_u, self.amor_w, self.amor_b


def log_normal_density(x: Tensor, mean: Tensor | float, log_variance: Tensor) -> Tensor:
    """Returns Σ_dim1 -½ (log σ² + (x - mean)² / σ²), the reference's ``log_normal_dist`` (no 2π constant)."""
    return torch.sum(-0.5 * (log_variance + (x - mean) * (x - mean) * log_variance.exp().reciprocal()), 1)


def flow_kl_divergence(sample: FlowSample, batch_size: int) -> Tensor:
    """Returns [Σ (log q(z_0) - log N(z_K; 0, I)) - Σ log det] / ``batch_size`` (the flow's KL term).

    ``batch_size`` is the number of images of the step. The reference evaluates log N(z_K; 0, I) with a
    (batch_size, D) zero log-variance, so a single draw (the image-agnostic flows) is broadcast to ``batch_size`` rows:
    its density difference counts ``batch_size`` times and the total is divided by ``batch_size``, while its log-det
    counts once. Reproduced here: for one draw the term is (log q - log p) - log det / batch_size.
    """
    log_variance = torch.zeros(batch_size, sample.zk.shape[1], dtype=sample.zk.dtype, device=sample.zk.device)
    log_p_zk = log_normal_density(sample.zk, 0, log_variance) + 1e-8
    log_q_z0 = log_normal_density(sample.z0, sample.mu, sample.variance.log()) + 1e-8
    return (torch.sum(log_q_z0 - log_p_zk) - torch.sum(sample.log_det)) / batch_size
