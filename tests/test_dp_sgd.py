"""DP-SGD on generic torch modules: per-sample gradients, clipping, noise calibration, learning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from edge_agent.dp_sgd import DPSGD


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _loop_gradients(module, loss_fn, inputs, targets):
    """Reference: one backward pass per example."""
    grads = []
    for i in range(targets.shape[0]):
        module.zero_grad()
        example = tuple(x[i : i + 1] for x in inputs)
        loss_fn(module(*example), targets[i : i + 1]).backward()
        grads.append({n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad})
    return grads


class _TwoInputs(nn.Module):
    """Stands in for a graph executor: raw parameters, generic ops, several inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 2))
        self.v = nn.Parameter(torch.randn(3, 2))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("offset", torch.full((2,), 0.5))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.tanh(a @ self.w) * (b @ self.v) + self.frozen * self.offset


@pytest.mark.parametrize("kind", ["sequential", "two_inputs"])
def test_per_sample_gradients_match_per_example_backward(kind):
    torch.manual_seed(1)
    if kind == "sequential":
        module, loss_fn = _mlp(), nn.CrossEntropyLoss()
        inputs, targets = (torch.randn(7, 5),), torch.randint(0, 3, (7,))
    else:
        module, loss_fn = _TwoInputs(), nn.MSELoss()
        inputs, targets = (torch.randn(7, 4), torch.randn(7, 3)), torch.randn(7, 2)
    dp = DPSGD(module, loss_fn, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=7, rng_seed=0)
    grads, losses = dp.per_sample_gradients(inputs if kind == "two_inputs" else inputs[0], targets)
    reference = _loop_gradients(module, loss_fn, inputs, targets)
    assert set(grads) == {n for n, p in module.named_parameters() if p.requires_grad}
    for i, ref in enumerate(reference):
        for name, g in grads.items():
            torch.testing.assert_close(g[i], ref[name], rtol=1e-5, atol=1e-6)
    assert losses.shape == (7,)
    torch.testing.assert_close(
        losses[2], loss_fn(module(*(x[2:3] for x in inputs)), targets[2:3]).detach()
    )


def test_dropout_in_training_mode_draws_a_mask_per_example():
    torch.manual_seed(5)
    module = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Linear(16, 1)).train()
    dp = DPSGD(module, nn.MSELoss(), 1.0, 1.0, expected_batch_size=8, rng_seed=0)
    grads, _ = dp.per_sample_gradients(torch.ones(8, 5), torch.zeros(8, 1))
    # Identical examples: only independent dropout masks can make their gradients differ.
    assert not torch.allclose(grads["0.weight"][0], grads["0.weight"][1])


def test_each_example_is_clipped_to_the_bound_before_summing():
    module, loss_fn = _mlp(), nn.CrossEntropyLoss()
    torch.manual_seed(2)
    x = torch.randn(10, 5)
    x[:5] *= 50.0  # large inputs -> large gradients that must be clipped
    y = torch.randint(0, 3, (10,))
    clip = 2.0
    dp = DPSGD(module, loss_fn, clip_norm=clip, noise_multiplier=0.0, expected_batch_size=10, rng_seed=0)
    reference = _loop_gradients(module, loss_fn, (x,), y)
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in r.values())) for r in reference]
    assert max(norms) > clip > min(norms)  # both regimes are exercised

    for i in range(10):
        single, _ = dp.clipped_gradient_sum(x[i : i + 1], y[i : i + 1])
        clipped_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in single.values()))
        assert clipped_norm <= clip * (1 + 1e-5)
        assert clipped_norm == pytest.approx(min(norms[i], clip), rel=1e-4)

    summed, _ = dp.clipped_gradient_sum(x, y)
    for name, total in summed.items():
        expected = sum(min(1.0, clip / n) * r[name] for n, r in zip(norms, reference, strict=True))
        torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-6)


def _zero_gradient_setup(noise_multiplier, clip, batch, seed=3):
    module = nn.Linear(200, 60)

    def no_signal(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (output * 0.0).sum()

    dp = DPSGD(module, no_signal, clip, noise_multiplier, expected_batch_size=batch, rng_seed=seed)
    return module, dp


def test_noise_std_matches_calibration_on_zero_gradients():
    z, clip, batch = 1.3, 0.7, 8
    module, dp = _zero_gradient_setup(z, clip, batch)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    dp.step(optimizer, torch.randn(batch, 200), torch.zeros(batch, 60))
    noise = torch.cat([p.grad.flatten() for p in module.parameters()]).double()
    # 12,060 noise values: relative standard error of the std estimate ~0.6 %.
    assert float(noise.std()) == pytest.approx(z * clip / batch, rel=0.03)
    assert abs(float(noise.mean())) < 5 * z * clip / batch / math.sqrt(noise.numel())


def test_noise_is_reproducible_from_the_seed_only():
    grads = []
    for seed in (5, 5, 6):
        module, dp = _zero_gradient_setup(1.0, 1.0, 4, seed)
        dp.step(torch.optim.SGD(module.parameters(), lr=0.0), torch.randn(4, 200), torch.zeros(4, 60))
        grads.append(module.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert not torch.equal(grads[0], grads[2])


def test_empty_poisson_batch_still_takes_a_noise_only_step():
    module, dp = _zero_gradient_setup(1.0, 1.0, 4)
    before = module.weight.detach().clone()
    loss = dp.step(torch.optim.SGD(module.parameters(), lr=1.0), torch.empty(0, 200), torch.empty(0, 60))
    assert math.isnan(loss)
    assert not torch.equal(module.weight.detach(), before)


def test_poisson_batches_have_the_expected_size_on_average():
    _, dp = _zero_gradient_setup(1.0, 1.0, 25)
    sizes = torch.tensor([dp.sample_indices(1_000).numel() for _ in range(2_000)], dtype=torch.float64)
    assert float(sizes.mean()) == pytest.approx(25.0, rel=0.02)
    # Binomial(1000, 0.025) spread: a fixed-size sampler would have zero variance.
    assert float(sizes.var()) == pytest.approx(1_000 * 0.025 * 0.975, rel=0.15)
    batch = dp.sample_indices(1_000)
    assert torch.all(batch[1:] > batch[:-1]) and int(batch.max()) < 1_000


def test_private_logistic_regression_still_learns():
    torch.manual_seed(4)
    n, d = 2_000, 10
    true_w = torch.randn(d)
    x = torch.randn(n, d)
    y = ((x @ true_w + 0.3 * torch.randn(n)) > 0).float().unsqueeze(1)
    model = nn.Linear(d, 1)
    loss_fn = nn.BCEWithLogitsLoss()
    dp = DPSGD(model, loss_fn, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=64, rng_seed=7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.no_grad():
        initial = float(loss_fn(model(x), y))
    for _ in range(300):
        idx = dp.sample_indices(n)
        dp.step(optimizer, x[idx], y[idx])
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
        accuracy = float(((model(x) > 0).float() == y).float().mean())
    assert initial > 0.5
    assert final < 0.6 * initial
    assert accuracy > 0.85


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_norm": 0.0},
        {"clip_norm": math.nan},
        {"noise_multiplier": -1.0},
        {"expected_batch_size": 0},
    ],
)
def test_bad_configuration_is_rejected(kwargs):
    config = {"clip_norm": 1.0, "noise_multiplier": 1.0, "expected_batch_size": 4} | kwargs
    with pytest.raises(ValueError):
        DPSGD(_mlp(), nn.CrossEntropyLoss(), **config)


def test_mismatched_batch_is_a_clear_error():
    dp = DPSGD(_mlp(), nn.CrossEntropyLoss(), 1.0, 1.0, 4, rng_seed=0)
    with pytest.raises(ValueError, match="batch size"):
        dp.per_sample_gradients(torch.randn(4, 5), torch.randint(0, 3, (3,)))
    with pytest.raises(ValueError, match="expected_batch_size"):
        dp.sample_indices(2)
