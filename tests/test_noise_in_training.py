"""The gradient noise scale measured during training, from accumulation's micro-batches."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from sgdnoise.config import from_dict, with_values
from sgdnoise.theory.noise_scale import NoiseWindow, estimate
from sgdnoise.train import train

from helpers import SMALL, tracking_uri, write_project


def test_window_sums_the_micro_batch_and_full_batch_gradient_norms() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    K, M = 4, 8
    window = NoiseWindow(members=1, micro_batches=K, micro=M, batch=32)
    micro_sq = []

    def grads() -> list[torch.Tensor]:  # as the run loop shows them: with a member axis
        return [p.grad.unsqueeze(0) for p in model.parameters()]

    for j in range(K):
        xb, yb = x[j * M : (j + 1) * M], y[j * M : (j + 1) * M]
        g = torch.autograd.grad(F.cross_entropy(model(xb), yb), list(model.parameters()))
        micro_sq.append(sum(t.pow(2).sum() for t in g).item())
        (F.cross_entropy(model(xb), yb) / K).backward()
        window.after_micro_batch(grads(), j)
    window.after_step(grads())
    full = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    full_sq = sum(t.pow(2).sum() for t in full).item()
    small, big, n = window.sums[0].tolist()
    assert n == K
    assert abs(small / n - sum(micro_sq) / K) <= 1e-5 * small / n
    assert abs(big - full_sq) <= 1e-5 * big
    g_sq, tr = estimate(sum(micro_sq) / K, M, full_sq, 32)
    (got,) = window.estimates()
    assert abs(got - tr / g_sq) <= 1e-4 * abs(tr / g_sq)


def test_runs_with_accumulation_log_the_noise_scale(tmp_path: Path) -> None:
    root = write_project(tmp_path, SMALL)
    values = {"train.batch_size": 64, "train.budget.value": 10}
    cfg = from_dict(with_values(SMALL, {**values, "train.micro_batch_size": 16}))
    res = train(cfg, root=root)
    assert res.metrics["grad_noise_scale"] > 0
    assert "grad_noise_scale" in res.history[-1] and "grad_noise_scale" not in res.history[0]
    # One value per evaluation in the run's history: the final metrics do not log it again.
    logged = MlflowClient(tracking_uri(root)).get_metric_history(res.run_id, "grad_noise_scale")
    curve = [(h["step"], h["grad_noise_scale"]) for h in res.history if "grad_noise_scale" in h]
    assert sorted((m.step, m.value) for m in logged) == curve
    plain = train(from_dict(with_values(SMALL, values)), root=root, track=False)
    assert "grad_noise_scale" not in plain.metrics
    assert plain.state_sha256 != "" and res.run_key == plain.run_key
