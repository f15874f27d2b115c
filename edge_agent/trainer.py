"""Local training and evaluation of an ONNX model on the hospital's own data.

Training runs the ONNX graph through the project's own executor (``shared.onnx_executor``):
the model is data, no code from outside runs here. Evaluation uses onnxruntime on the very
file the registry holds, so the scores are those of the deployed artefact.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch

from shared.onnx_executor import OnnxModule
from shared.onnx_model import load_model_bytes, model_to_bytes, replace_initializers
from shared.protocol import EvalMetrics, TrainingConfig


class TrainingError(RuntimeError):
    """Training could not produce a usable update (diverged, empty data, shape mismatch)."""


@dataclass(frozen=True)
class TrainResult:
    weights: dict[str, np.ndarray]
    delta: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float]
    seconds: float


def _targets(y: np.ndarray, loss: str) -> torch.Tensor:
    if loss == "cross_entropy":
        return torch.as_tensor(y, dtype=torch.long)
    return torch.as_tensor(y, dtype=torch.float32).reshape(-1, 1)


def _loss_fn(loss: str) -> torch.nn.Module:
    return {"bce": torch.nn.BCELoss(), "bce_logits": torch.nn.BCEWithLogitsLoss(),
            "cross_entropy": torch.nn.CrossEntropyLoss(), "mse": torch.nn.MSELoss()}[loss]


def _batches(n: int, cfg: TrainingConfig, gen: torch.Generator):
    """Index batches: ``local_steps`` batches (reshuffling each pass) or ``local_epochs`` full passes."""
    steps = cfg.local_steps if cfg.local_steps is not None else math.ceil(n / cfg.batch_size) * cfg.local_epochs
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            if done == steps:
                return
            yield order[start:start + cfg.batch_size]
            done += 1


def train(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, cfg: TrainingConfig, *, seed: int) -> TrainResult:
    """Train locally from the given model; returns new weights and the update (new - old)."""
    if len(y) == 0:
        raise TrainingError("no training rows: check FEDMQ_DATA_TRAIN")
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
    gen = torch.Generator().manual_seed(seed)
    module.train()
    losses = []
    for idx in _batches(len(yt), cfg, gen):
        opt.zero_grad()
        out = module(xt[idx])
        loss = loss_fn(out, yt[idx])
        if anchors:
            loss = loss + cfg.proximal_mu / 2 * sum(((params[k] - a) ** 2).sum() for k, a in anchors.items())
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} after {len(losses)} steps; lower the learning rate")
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    weights = module.onnx_state()
    delta = {k: (weights[k] - base[k]).astype(np.float32) for k in base}
    metrics = {"loss_first": losses[0], "loss_last": losses[-1], "loss_mean": float(np.mean(losses)),
               "steps": float(len(losses))}
    return TrainResult(weights, delta, len(yt), metrics, time.perf_counter() - started)


def finetune(model_bytes: bytes, x: np.ndarray, y: np.ndarray, cfg: TrainingConfig, *, seed: int) -> bytes:
    """The model adapted locally for ``cfg.finetune_steps`` steps: this site's personalized variant."""
    model = load_model_bytes(model_bytes)
    tuning = cfg.model_copy(update={"local_steps": cfg.finetune_steps, "local_epochs": None, "proximal_mu": 0.0})
    return model_to_bytes(replace_initializers(model, train(model, x, y, tuning, seed=seed).weights))


def evaluate(model_bytes: bytes, x: np.ndarray, y: np.ndarray, loss: str) -> EvalMetrics:
    """Score a model file with onnxruntime; counts let the orchestrator pool across sites exactly."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
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
        return EvalMetrics(num_examples=n, loss=value)
    return EvalMetrics(num_examples=n, loss=value, accuracy=correct / n if n else 0.0, correct=correct)
