"""Local training and evaluation of an ONNX model on the hospital's own data.

Training runs the ONNX graph through the project's own executor (``shared.onnx_executor``):
the model is data, no code from outside runs here. Evaluation uses onnxruntime on the very
file the registry holds, so the scores are those of the deployed artefact. onnxruntime is
imported on the first evaluation, not at start-up: an idle agent does not hold it.

Both run on the thread count :func:`use_threads` fixed at the agent's start (setting
``torch_threads``): torch's default, one thread per core, is a poor fit for the small models
hospitals federate on servers whose cores other work keeps busy.

With the site's sample-level differential privacy (:class:`DPSGDConfig`), every step is a
DP-SGD step (``edge_agent.dp_sgd``) on a Poisson-sampled batch of expected size
``batch_size``, the mechanism the site's accountant charges for.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from edge_agent.dp_sgd import DPSGD
from shared.onnx_executor import OnnxModule
from shared.onnx_model import load_model_bytes, model_to_bytes, replace_initializers
from shared.protocol import EvalMetrics, TrainingConfig

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training could not produce a usable update (diverged, empty data, shape mismatch), or may not run.

    ``code`` is the monitoring error code (``shared.protocol.ERROR_CODES``): ``training.failed``
    unless a privacy rule refused the round (``privacy.floor``, ``privacy.budget_spent``).
    """

    def __init__(self, message: str, code: str = "training.failed") -> None:
        super().__init__(message)
        self.code = code


StepCallback = Callable[[int, int], None]
"""Called after each optimizer step with (steps done, steps planned): progress for the site's status."""


@dataclass(frozen=True)
class DPSGDConfig:
    """The site's own DP-SGD parameters (from its settings, never from the round command)."""

    clip_norm: float
    noise_multiplier: float


@dataclass(frozen=True)
class TrainResult:
    weights: dict[str, np.ndarray]
    delta: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float]
    seconds: float


def use_threads(threads: int) -> None:
    """Fix this process's torch thread counts (0 keeps torch's default); evaluation follows them.

    The inter-op pool can only be sized before torch's first parallel work, so it is set here
    at start-up; when that moment has passed (a second agent in the same process), it keeps
    its size and only the intra-op count changes, which is where training spends its threads.
    """
    if threads:
        torch.set_num_threads(threads)
        if torch.get_num_interop_threads() != threads:
            try:
                torch.set_num_interop_threads(threads)
            except RuntimeError:  # parallel work has started in this process: the pool's size is fixed
                pass
    log.info("training and scoring on %d intra-op / %d inter-op torch thread(s) (setting torch_threads=%d)",
             torch.get_num_threads(), torch.get_num_interop_threads(), threads)


def warm_up() -> None:
    """Pay torch's one-off lazy imports (the first optimizer pulls in torch._dynamo, ~3 s) at start-up,
    not inside the first round's training time."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1).step()


def _targets(y: np.ndarray, loss: str) -> torch.Tensor:
    if loss == "cross_entropy":
        return torch.as_tensor(y, dtype=torch.long)
    return torch.as_tensor(y, dtype=torch.float32).reshape(-1, 1)


def _loss_fn(loss: str) -> torch.nn.Module:
    return {"bce": torch.nn.BCELoss(), "bce_logits": torch.nn.BCEWithLogitsLoss(),
            "cross_entropy": torch.nn.CrossEntropyLoss(), "mse": torch.nn.MSELoss()}[loss]


def planned_steps(n: int, cfg: TrainingConfig) -> int:
    """Optimizer steps ``train`` takes on ``n`` rows: known before training, so privacy can be charged first."""
    return cfg.local_steps if cfg.local_steps is not None else math.ceil(n / cfg.batch_size) * cfg.local_epochs


def check_private_training(n: int, cfg: TrainingConfig) -> None:
    """Refuse round settings DP-SGD cannot follow; the agent calls it before spending any budget."""
    if cfg.proximal_mu > 0:
        raise TrainingError("the round asks for FedProx (proximal_mu > 0), which this site's DP-SGD does not "
                            "support: its per-record clipping would also clip the proximal term")
    if cfg.batch_size > n:
        raise TrainingError(f"DP-SGD samples batches of expected size batch_size={cfg.batch_size}, more than the "
                            f"{n} training rows; the federation must use a smaller batch_size")


def _batches(n: int, cfg: TrainingConfig, gen: torch.Generator):
    """Index batches: ``local_steps`` batches (reshuffling each pass) or ``local_epochs`` full passes."""
    steps = planned_steps(n, cfg)
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            if done == steps:
                return
            yield order[start:start + cfg.batch_size]
            done += 1


def train(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, cfg: TrainingConfig, *, seed: int,
          dp: DPSGDConfig | None = None, on_step: StepCallback | None = None) -> TrainResult:
    """Train locally from the given model; returns new weights and the update (new - old).

    With ``dp``, training is DP-SGD and the metrics are only the step count: losses on the
    training rows are not noised, so reporting them would leak what DP-SGD protects.
    ``on_step`` hears of every step taken (it should be cheap: it runs between steps).
    """
    if len(y) == 0:
        raise TrainingError("no training rows: check FEDMQ_DATA_TRAIN")
    if dp is not None:
        check_private_training(len(y), cfg)
    started = time.perf_counter()
    torch.manual_seed(seed)
    module = OnnxModule(model)
    base = module.onnx_state()
    params = module.onnx_parameters()
    anchors = {k: p.detach().clone() for k, p in params.items()} if cfg.proximal_mu > 0 else {}
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params.values(), lr=cfg.learning_rate,
                                                      weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params.values(), lr=cfg.learning_rate, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
    loss_fn = _loss_fn(cfg.loss)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = _targets(y, cfg.loss)
    module.train()
    total = planned_steps(len(yt), cfg)
    step_done: Callable[[int], None] = (lambda done: on_step(done, total)) if on_step else (lambda done: None)
    if dp is not None:
        _train_private(module, opt, loss_fn, xt, yt, cfg, dp, step_done)
        metrics = {"steps": float(total)}
    else:
        metrics = _train_plain(module, opt, loss_fn, xt, yt, cfg, anchors, seed, step_done)
    weights = module.onnx_state()
    if not all(np.all(np.isfinite(w)) for w in weights.values()):
        raise TrainingError("training produced non-finite weights; lower the learning rate")
    delta = {k: (weights[k] - base[k]).astype(np.float32) for k in base}
    return TrainResult(weights, delta, len(yt), metrics, time.perf_counter() - started)


def _train_plain(module: OnnxModule, opt: torch.optim.Optimizer, loss_fn: torch.nn.Module, x: torch.Tensor,
                 y: torch.Tensor, cfg: TrainingConfig, anchors: dict[str, torch.Tensor], seed: int,
                 step_done: Callable[[int], None]) -> dict[str, float]:
    """Minibatch steps (FedProx's proximal term when ``anchors``); returns the loss metrics."""
    params = module.onnx_parameters()
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for idx in _batches(len(y), cfg, gen):
        opt.zero_grad()
        out = module(x[idx])
        loss = loss_fn(out, y[idx])
        if anchors:
            loss = loss + cfg.proximal_mu / 2 * sum(((params[k] - a) ** 2).sum() for k, a in anchors.items())
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} after {len(losses)} steps; lower the learning rate")
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step_done(len(losses))
    return {"loss_first": losses[0], "loss_last": losses[-1], "loss_mean": float(np.mean(losses)),
            "steps": float(len(losses))}


def _train_private(module: OnnxModule, opt: torch.optim.Optimizer, loss_fn: torch.nn.Module, x: torch.Tensor,
                   y: torch.Tensor, cfg: TrainingConfig, dp: DPSGDConfig, step_done: Callable[[int], None]) -> None:
    """DP-SGD steps on Poisson batches; noise and sampling draw from the OS CSPRNG, never from the round's seed."""
    private = DPSGD(module, loss_fn, dp.clip_norm, dp.noise_multiplier, expected_batch_size=cfg.batch_size)
    try:
        for done in range(1, planned_steps(len(y), cfg) + 1):
            idx = private.sample_indices(len(y))
            private.step(opt, x[idx], y[idx])
            step_done(done)
    except (RuntimeError, ValueError) as e:  # torch.func refuses graphs whose examples interact (BatchNorm)
        raise TrainingError(f"DP-SGD cannot train this model: {e}; per-record gradients need a model without "
                            "batch statistics (no BatchNorm in training mode)") from None


def finetune(model_bytes: bytes, x: np.ndarray, y: np.ndarray, cfg: TrainingConfig, *, seed: int,
             dp: DPSGDConfig | None = None) -> bytes:
    """The model adapted locally for ``cfg.finetune_steps`` steps: this site's personalized variant."""
    model = load_model_bytes(model_bytes)
    tuning = cfg.model_copy(update={"local_steps": cfg.finetune_steps, "local_epochs": None, "proximal_mu": 0.0})
    return model_to_bytes(replace_initializers(model, train(model, x, y, tuning, seed=seed, dp=dp).weights))


def evaluate(model_bytes: bytes, x: np.ndarray, y: np.ndarray, loss: str) -> EvalMetrics:
    """Score a model file with onnxruntime; counts let the orchestrator pool across sites exactly."""
    import onnxruntime as ort  # ~20 MB resident: loaded when the agent first scores, not while it idles

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # the agent's thread setting (use_threads)
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = np.concatenate([sess.run(None, {name: x[i:i + 4096].astype(np.float32)})[0]
                          for i in range(0, len(x), 4096)]).astype(np.float64)
    n = len(y)
    eps = 1e-7
    if loss in ("bce", "bce_logits"):
        p = out.reshape(-1) if loss == "bce" else 1 / (1 + np.exp(-out.reshape(-1)))
        p = np.clip(p, eps, 1 - eps)
        value = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        correct = int(((p >= 0.5) == (y >= 0.5)).sum())
    elif loss == "cross_entropy":
        shifted = out - out.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        value = float(-logp[np.arange(n), y.astype(int)].mean())
        correct = int((out.argmax(axis=1) == y.astype(int)).sum())
    else:
        value = float(np.mean((out.reshape(-1) - y) ** 2))
    if not math.isfinite(value):
        raise TrainingError(f"the model's {loss} loss on the local test set is {value} (its outputs overflow: the "
                            "federation has diverged; lower the learning rate and restart from an earlier version)")
    if loss == "mse":
        return EvalMetrics(num_examples=n, loss=value)
    return EvalMetrics(num_examples=n, loss=value, accuracy=correct / n if n else 0.0, correct=correct)
