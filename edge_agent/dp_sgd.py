"""Sample-level DP-SGD (Abadi et al. 2016) for any ``torch.nn.Module``.

Client-level DP protects a hospital as a whole inside the federation; DP-SGD
protects each patient record inside a site's own training, so that even the
site's update bounds what it reveals about one record.

Per-example gradients come from ``torch.func`` (``functional_call`` + ``vmap``
+ ``grad``), not from Opacus: Opacus' ``GradSampleModule`` computes per-sample
gradients with hooks written for known layer types (``nn.Linear``,
``nn.Conv2d``, ...), while the agent trains an ONNX graph through the
project's own executor module, whose parameters are plain ``nn.Parameter``
tensors used by generic tensor ops -- there is no layer for Opacus to hook.
``vmap`` differentiates the module's functional form instead, which works for
any module whose forward treats examples independently (no batch statistics:
BatchNorm in training mode both breaks ``vmap`` and breaks the privacy
analysis, since one record then influences the others' gradients).

Sampling: batches are Poisson samples (each record independently with
probability ``q = expected_batch_size / dataset_size``; see
:meth:`DPSGD.sample_indices`) and the noisy gradient sum is divided by the
*expected* batch size. That is exactly the mechanism analysed by
:class:`shared.privacy.accountant.SampleLevelAccountant`; the common shortcut
of shuffled fixed-size batches is not covered by that analysis (Chua et al.
2024, "How Private are DP-SGD Implementations?"), so the trainer should draw
its batches from :meth:`DPSGD.sample_indices`.

Memory: per-example gradients cost ``batch size x parameter count`` floats at
once, so ``expected_batch_size`` is bounded by memory as well as by privacy.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

Inputs = torch.Tensor | tuple[torch.Tensor, ...]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Gradients = dict[str, torch.Tensor]

_NORM_EPS = 1e-6


class DPSGD:
    """Clip each example's gradient to ``clip_norm``, sum, add N(0, (z C)^2), divide, step.

    ``loss_fn(output, target)`` is called on a batch of one example (e.g.
    ``nn.CrossEntropyLoss()``) and must return a scalar. ``rng_seed`` seeds the
    noise generator for reproducible tests; leave it ``None`` in production so
    the seed comes from the OS CSPRNG -- noise an attacker can predict protects
    nothing. (The generator itself is torch's Mersenne Twister, as in common DP
    training libraries; its raw output is never published, only noisy sums.)
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: LossFn,
        clip_norm: float,
        noise_multiplier: float,
        expected_batch_size: int,
        rng_seed: int | None = None,
    ) -> None:
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm!r}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be a non-negative finite number, got {noise_multiplier!r}")
        if not isinstance(expected_batch_size, int) or expected_batch_size < 1:
            raise ValueError(f"expected_batch_size must be a positive int, got {expected_batch_size!r}")
        self.module = module
        self.loss_fn = loss_fn
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = expected_batch_size
        self._trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not self._trainable:
            raise ValueError("module has no trainable parameters")
        device = next(iter(self._trainable.values())).device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(secrets.randbits(63) if rng_seed is None else rng_seed)

    def sample_indices(self, dataset_size: int) -> torch.Tensor:
        """Indices of one Poisson batch: each record independently with probability q.

        The batch size varies (and can be zero); that randomness is part of what
        the accountant's privacy amplification by sampling assumes.
        """
        if not isinstance(dataset_size, int) or dataset_size < self.expected_batch_size:
            raise ValueError(
                f"dataset_size must be an int >= expected_batch_size={self.expected_batch_size}, "
                f"got {dataset_size!r}"
            )
        q = self.expected_batch_size / dataset_size
        draws = torch.rand(dataset_size, generator=self._generator, device=self._generator.device)
        return torch.nonzero(draws < q).flatten()

    def per_sample_gradients(self, inputs: Inputs, targets: torch.Tensor) -> tuple[Gradients, torch.Tensor]:
        """Gradient of each example's loss w.r.t. every trainable parameter, and the losses.

        Returns ``({name: tensor[B, *param.shape]}, losses[B])``. ``inputs`` is
        a tensor or a tuple of tensors (for graphs with several inputs), each
        batched along dimension 0 like ``targets``.
        """
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        batch = _batch_size(inputs, targets)
        if batch == 0:
            raise ValueError("per-sample gradients of an empty batch")
        params = {n: p.detach() for n, p in self._trainable.items()}
        frozen = {n: p.detach() for n, p in self.module.named_parameters() if not p.requires_grad}
        buffers = {n: b.detach() for n, b in self.module.named_buffers()}

        def example_loss(
            trainable: dict[str, torch.Tensor], example: tuple[torch.Tensor, ...], target: torch.Tensor
        ) -> torch.Tensor:
            state = {**frozen, **buffers, **trainable}
            output = functional_call(self.module, state, tuple(x.unsqueeze(0) for x in example))
            return self.loss_fn(output, target.unsqueeze(0))

        # randomness="different": each example draws its own dropout mask, as in ordinary batch training.
        per_example = vmap(grad_and_value(example_loss), in_dims=(None, 0, 0), randomness="different")
        grads, losses = per_example(params, inputs, targets)
        return grads, losses

    def clipped_gradient_sum(self, inputs: Inputs, targets: torch.Tensor) -> tuple[Gradients, torch.Tensor]:
        """Sum over the batch of per-example gradients, each first scaled to joint L2 norm <= C.

        The norm is taken over all parameters jointly because the privacy unit
        is the example, not the tensor. Returns ``(sums, losses)``.
        """
        grads, losses = self.per_sample_gradients(inputs, targets)
        norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
        factors = (self.clip_norm / (norms + _NORM_EPS)).clamp(max=1.0)
        sums = {n: torch.einsum("b,b...->...", factors, g) for n, g in grads.items()}
        return sums, losses

    def step(self, optimizer: torch.optim.Optimizer, inputs: Inputs, targets: torch.Tensor) -> float:
        """One private optimizer step on a (Poisson-sampled) batch; returns its mean loss.

        Sets each trainable parameter's ``.grad`` to
        ``(clipped sum + N(0, (z C)^2)) / expected_batch_size`` and calls
        ``optimizer.step()``. An empty batch still takes a noise-only step --
        skipping it would reveal that the batch was empty -- and returns NaN as
        its loss.
        """
        batch = _batch_size(inputs if isinstance(inputs, tuple) else (inputs,), targets)
        if batch:
            sums, losses = self.clipped_gradient_sum(inputs, targets)
            loss = float(losses.mean())
        else:
            sums = {n: torch.zeros_like(p) for n, p in self._trainable.items()}
            loss = math.nan
        std = self.noise_multiplier * self.clip_norm
        for name, param in self._trainable.items():
            noise = torch.normal(0.0, std, size=param.shape, generator=self._generator, device=param.device)
            param.grad = ((sums[name] + noise.to(sums[name].dtype)) / self.expected_batch_size).detach()
        optimizer.step()
        return loss


def _batch_size(inputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> int:
    if not inputs or not all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in (*inputs, targets)):
        raise ValueError("inputs and targets must be tensors batched along dimension 0")
    sizes = {x.shape[0] for x in (*inputs, targets)}
    if len(sizes) != 1:
        raise ValueError(f"inputs and targets disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()
