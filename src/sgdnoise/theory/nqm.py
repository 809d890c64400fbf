"""The noisy quadratic model (NQM) of Zhang et al. (2019), with exact expected dynamics.

Model. Loss L(θ) = ½ Σ_i h_i θ_i² (a diagonal quadratic), stochastic gradient
g = Hθ + ξ with E[ξ] = 0 and Cov[ξ] = C / B, C = diag(c), B the batch size. Defaults follow
Zhang et al.: h_i = 1/i for i = 1..10⁴, c_i = h_i (gradient covariance equal to the Hessian)
and θ_0,i = 1.

Optimizers. Plain SGD, θ ← θ − α g, and heavy-ball momentum in the PyTorch form
v ← β v + g, θ ← θ − α v (v_0 = 0). The *effective* learning rate is α / (1 − β); SGD is
β = 0.

Loss convention. "Loss" always means the expected NQM loss E[L_t] = Σ_i ℓ_i,t with the
per-dimension loss ℓ_i,t = ½ h_i E[θ_i,t²] (including the ½ of L). With this convention,
for SGD at constant α (Zhang et al.; docs/protocol.md)

    E[ℓ_t] = (1 − αh)^{2t} ℓ_0 + α c / (2B (2 − αh)) · (1 − (1 − αh)^{2t}),

and the heavy-ball steady state is ℓ_∞ = (1 + β) α c / (2B (1 − β)(2β + 2 − αh)).

Exactness. Nothing is sampled. Dimensions are independent, so each one is a small linear
system in its second moments, propagated step by step (vectorized over dimensions, looped
over time) for any step-size schedule:

* SGD: P = E[θ²],  P' = (1 − αh)² P + α² c/B.
* Momentum, with s = c/B, A = 1 − αh and (P, Q, R) = (E[θ²], E[θv], E[v²]); from
  v' = hθ + βv + ξ and θ' = Aθ − αβv − αξ (ξ independent of (θ, v)):

      P' = A² P − 2Aαβ Q + α²β² R + α² s
      Q' = Ah P + β(A − αh) Q − αβ² R − α s
      R' = h² P + 2hβ Q + β² R + s.

Divergence. Beyond the stability limit (αh > 2 for SGD, αh > 2(1 + β) for heavy ball) the
moments grow geometrically; the returned loss becomes a large finite number or ``inf`` (never
NaN, never a floating-point warning), and :func:`run` flags ``diverged``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "NQMConfig",
    "expected_loss",
    "recorded_steps",
    "run",
    "search_lr",
    "spectrum",
    "steady_state_loss",
    "steps_to_target",
]

# A run "diverged" when its final expected loss exceeds this multiple of the initial one.
DIVERGENCE_FACTOR = 1e6


@dataclass
class NQMConfig:
    """The NQM problem: spectrum, gradient-noise covariance and initial point.

    h_i = i^(−h_power) for i = 1..dim, c_i = c_scale · h_i, θ_0,i = theta0. Explicit arrays
    ``h`` (and optionally ``c``) override the power law; then ``dim`` is ignored and, if ``c``
    is None, c = c_scale · h. ``theta0`` may be a scalar or an array of length dim.
    """

    dim: int = 10_000
    h_power: float = 1.0
    c_scale: float = 1.0
    theta0: float | np.ndarray = 1.0
    h: np.ndarray | None = None
    c: np.ndarray | None = None


def spectrum(cfg: NQMConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h, c, theta0_sq): curvatures, noise variances per example, and E[θ_0²] (float64)."""
    if cfg.h is not None:
        h = np.asarray(cfg.h, dtype=np.float64).ravel()
    else:
        if cfg.dim < 1:
            raise ValueError(f"dim must be >= 1, got {cfg.dim}")
        h = np.arange(1, cfg.dim + 1, dtype=np.float64) ** (-cfg.h_power)
    if cfg.c is not None:
        c = np.asarray(cfg.c, dtype=np.float64).ravel()
        if c.shape != h.shape:
            raise ValueError(f"c has shape {c.shape}, h has shape {h.shape}")
    else:
        c = cfg.c_scale * h
    theta0 = np.broadcast_to(np.asarray(cfg.theta0, dtype=np.float64), h.shape)
    return h, c, theta0**2


def recorded_steps(n_steps: int, record_every: int = 1) -> np.ndarray:
    """The step indices at which :func:`expected_loss` records: 0, k, 2k, ... and n_steps."""
    if record_every < 1:
        raise ValueError(f"record_every must be >= 1, got {record_every}")
    steps = np.arange(0, n_steps + 1, record_every)
    if steps[-1] != n_steps:
        steps = np.append(steps, n_steps)
    return steps


def expected_loss(
    h: np.ndarray,
    c: np.ndarray,
    theta0_sq: np.ndarray | float,
    lrs: np.ndarray,
    batch_size: int,
    momentum: float = 0.0,
    record_every: int = 1,
    *,
    stop_at: float | None = None,
) -> np.ndarray:
    """Exact expected loss E[L_t] = Σ_i ½ h_i E[θ_i,t²] at t = 0..len(lrs).

    Args:
        h, c: curvatures and per-example gradient-noise variances (the noise of a batch of B
            examples has variance c / B per dimension).
        theta0_sq: E[θ_0²] per dimension (scalar broadcasts); v_0 = 0.
        lrs: the raw step size α_t used at step t (NOT the effective rate: with momentum β
            the effective rate is α_t / (1 − β)). Any schedule, any length.
        batch_size: B.
        momentum: heavy-ball β in [0, 1); 0 is plain SGD.
        record_every: record every k-th step, plus the final step; see :func:`recorded_steps`.
        stop_at: if given, stop at the first recorded step whose loss is <= stop_at and
            return the curve up to and including it (saves time in learning-rate searches).

    Returns:
        float64 array of the expected loss at the recorded steps. Once the loss is no longer
        finite, the remaining entries are ``inf``.
    """
    h = np.asarray(h, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    if h.ndim != 1 or c.shape != h.shape:
        raise ValueError(f"h and c must be 1-D of equal shape, got {h.shape} and {c.shape}")
    lrs_arr = np.asarray(lrs, dtype=np.float64)
    if lrs_arr.ndim != 1:
        raise ValueError(f"lrs must be 1-D (one step size per step), got shape {lrs_arr.shape}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    n_steps = len(lrs_arr)
    steps = recorded_steps(n_steps, record_every)
    curve = np.full(len(steps), np.inf)
    half_h = 0.5 * h
    s = c / batch_size  # per-dimension gradient-noise variance of one batch
    p = np.broadcast_to(np.asarray(theta0_sq, dtype=np.float64), h.shape).copy()
    curve[0] = float(half_h @ p)
    if stop_at is not None and curve[0] <= stop_at:
        return curve[:1]
    lib = _kernel()
    if lib is not None:
        k = _native_loop(lib, p, h, s, half_h, lrs_arr, momentum, record_every, curve, stop_at)
        return curve[: k + 1]
    # Python floats: indexing a list is much cheaper than indexing a numpy array in the loop.
    alphas = lrs_arr.tolist()
    with np.errstate(over="ignore", invalid="ignore"):
        if momentum == 0.0:
            k = _sgd_loop(p, h, s, half_h, alphas, record_every, curve, stop_at)
        else:
            k = _momentum_loop(p, h, s, half_h, alphas, momentum, record_every, curve, stop_at)
    return curve[: k + 1]


def _kernel() -> Any:
    """The C recursion (sgdnoise/native/nqm.c), or None: numpy's loops below."""
    from sgdnoise import native

    return native.library("nqm")


def _native_loop(lib, p, h, s, half_h, alphas, beta, record_every, curve, stop_at) -> int:
    """The loops below in one C call: the same elementwise operations in the same order, so
    the same moments; the recorded loss sums in another order than numpy's dot product."""
    d, n_steps, slots = len(h), len(alphas), len(curve)
    h, s, half_h = (np.ascontiguousarray(a, dtype=np.float64) for a in (h, s, half_h))
    alphas = np.ascontiguousarray(alphas, dtype=np.float64)
    stop = (1, float(stop_at)) if stop_at is not None else (0, 0.0)

    def ptr(a: np.ndarray) -> int:
        return a.ctypes.data

    if beta == 0.0:
        scratch = np.empty(2 * d)
        return int(lib.sgdn_nqm_sgd(d, ptr(p), ptr(h), ptr(s), ptr(half_h), ptr(alphas),
                                    n_steps, record_every, ptr(curve), slots, *stop,
                                    ptr(scratch), ptr(scratch[d:])))  # fmt: skip
    q, r = np.zeros(d), np.zeros(d)  # v_0 = 0: E[θv] = E[v²] = 0
    return int(lib.sgdn_nqm_momentum(d, ptr(p), ptr(q), ptr(r), ptr(h), ptr(s), ptr(half_h),
                                     ptr(alphas), n_steps, beta, record_every, ptr(curve),
                                     slots, *stop))  # fmt: skip


def _record(curve: np.ndarray, k: int, loss: float, stop_at: float | None) -> bool:
    """Store the loss at record slot k; True when the loop should stop (diverged or at target)."""
    if not np.isfinite(loss):
        # NaN only arises from inf − inf in a diverged momentum run: it means "infinite".
        curve[k:] = np.inf
        return True
    curve[k] = loss
    return stop_at is not None and loss <= stop_at


def _sgd_loop(p, h, s, half_h, alphas, record_every, curve, stop_at) -> int:
    """P ← (1 − αh)² P + α² s in place; returns the last record slot written."""
    n_steps = len(alphas)
    alpha_prev = None
    k = 0
    for t in range(n_steps):
        alpha = alphas[t]
        if alpha != alpha_prev:  # coefficients change only when the step size does
            decay = (1.0 - alpha * h) ** 2
            noise = (alpha * alpha) * s
            alpha_prev = alpha
        np.multiply(p, decay, out=p)
        np.add(p, noise, out=p)
        t1 = t + 1
        if t1 % record_every == 0 or t1 == n_steps:
            k += 1
            if _record(curve, k, float(half_h @ p), stop_at):
                return k
    return k


def _momentum_loop(p, h, s, half_h, alphas, beta, record_every, curve, stop_at) -> int:
    """The 3×3 second-moment recursion of heavy ball (module docstring), in place."""
    n_steps = len(alphas)
    q = np.zeros_like(p)  # E[θv]: v_0 = 0
    r = np.zeros_like(p)  # E[v²]
    new_p, new_q, tmp = np.empty_like(p), np.empty_like(p), np.empty_like(p)
    # Coefficients that do not depend on α.
    rp, rq, rr = h * h, 2.0 * beta * h, beta * beta
    alpha_prev = None
    k = 0
    for t in range(n_steps):
        alpha = alphas[t]
        if alpha != alpha_prev:
            a = 1.0 - alpha * h
            pp, pq, pr, pn = a * a, (-2.0 * alpha * beta) * a, (alpha * beta) ** 2, alpha**2 * s
            qp, qq, qr, qn = a * h, beta * (a - alpha * h), -alpha * beta * beta, -alpha * s
            alpha_prev = alpha
        # P' = pp P + pq Q + pr R + pn
        np.multiply(pp, p, out=new_p)
        np.multiply(pq, q, out=tmp)
        new_p += tmp
        np.multiply(r, pr, out=tmp)
        new_p += tmp
        new_p += pn
        # Q' = qp P + qq Q + qr R + qn
        np.multiply(qp, p, out=new_q)
        np.multiply(qq, q, out=tmp)
        new_q += tmp
        np.multiply(r, qr, out=tmp)
        new_q += tmp
        new_q += qn
        # R' = rp P + rq Q + rr R + s  (R is last: it only needs the old P and Q)
        r *= rr
        np.multiply(rp, p, out=tmp)
        r += tmp
        np.multiply(rq, q, out=tmp)
        r += tmp
        r += s
        p, new_p = new_p, p
        q, new_q = new_q, q
        t1 = t + 1
        if t1 % record_every == 0 or t1 == n_steps:
            k += 1
            if _record(curve, k, float(half_h @ p), stop_at):
                return k
    return k


def steady_state_loss(
    h: np.ndarray, c: np.ndarray, lr: float, batch_size: int, momentum: float = 0.0
) -> float:
    """Closed-form stationary expected loss Σ_i ℓ_i,∞ at constant step size α = lr.

    ℓ_∞ = (1 + β) α c / (2B (1 − β)(2β + 2 − αh)) per dimension (β = 0 gives the SGD value
    α c / (2B (2 − αh))). ``inf`` if any dimension is outside the stability region
    0 < αh < 2(1 + β) (the same for the mean and the second moments), where the moments have
    no finite limit.
    """
    if lr <= 0.0:
        raise ValueError(f"lr must be positive, got {lr}")
    h = np.asarray(h, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    b = momentum
    if np.any(h <= 0.0) or np.any(lr * h >= 2.0 * (1.0 + b)):
        return float("inf")
    denom = 2.0 * batch_size * (1.0 - b) * (2.0 * b + 2.0 - lr * h)
    return float(np.sum((1.0 + b) * lr * c / denom))


def steps_to_target(
    curve: np.ndarray, target: float, steps: np.ndarray | None = None
) -> int | None:
    """First step whose expected loss is <= target, or None if never reached.

    Without ``steps`` the index into ``curve`` is returned (the step itself when the curve
    was recorded every step); with ``steps`` (e.g. from :func:`recorded_steps`) the
    corresponding step number, exact only up to the recording interval.
    """
    hit = np.flatnonzero(np.asarray(curve) <= target)
    if hit.size == 0:
        return None
    i = int(hit[0])
    return i if steps is None else int(steps[i])


def run(
    cfg: NQMConfig,
    *,
    batch_size: int,
    momentum: float = 0.0,
    lr_eff: float | None = None,
    n_steps: int | None = None,
    schedule: Callable[[int, int], float] | None = None,
    lrs_eff: np.ndarray | None = None,
    target: float | None = None,
    record_every: int = 1,
    stop_at_target: bool = False,
) -> dict:
    """One NQM run, parameterised by EFFECTIVE learning rates.

    Learning rates: give either
      * ``lr_eff`` and ``n_steps`` (and optionally ``schedule``, a multiplier f(t, total) such
        as ``sgdnoise.optim.smith2020``; default constant): ε_t = lr_eff · f(t, n_steps), or
      * ``lrs_eff``: the per-step effective rates ε_t directly (one per step).
    Either way the step size used is α_t = ε_t · (1 − momentum), so SGD and heavy ball at the
    same ε are compared at the same "temperature". (To pass raw step sizes, call
    :func:`expected_loss`.)

    Returns a dict with "final_loss", "initial_loss", "steps_to_target" (None without a target
    or if never reached; resolution ``record_every``), "curve" (expected loss at "steps"),
    "steps", "diverged" (final loss non-finite or above 1e6 × initial) and "lrs" (the step
    sizes α_t). With ``stop_at_target`` the run ends at the target, so "final_loss" is then
    the loss at that step.
    """
    if (lr_eff is None) == (lrs_eff is None):
        raise ValueError("give exactly one of lr_eff (with n_steps) or lrs_eff")
    if lrs_eff is None:
        if n_steps is None:
            raise ValueError("lr_eff needs n_steps")
        f = schedule if schedule is not None else (lambda t, total: 1.0)
        lrs_eff = np.array([lr_eff * f(t, n_steps) for t in range(n_steps)], dtype=np.float64)
    else:
        if n_steps is not None or schedule is not None:
            raise ValueError("n_steps and schedule go with lr_eff, not with lrs_eff")
        lrs_eff = np.asarray(lrs_eff, dtype=np.float64)
    alphas = lrs_eff * (1.0 - momentum)
    h, c, theta0_sq = spectrum(cfg)
    stop = target if (stop_at_target and target is not None) else None
    curve = expected_loss(h, c, theta0_sq, alphas, batch_size, momentum, record_every, stop_at=stop)
    steps = recorded_steps(len(alphas), record_every)[: len(curve)]
    initial, final = float(curve[0]), float(curve[-1])
    return {
        "final_loss": final,
        "initial_loss": initial,
        "steps_to_target": None if target is None else steps_to_target(curve, target, steps),
        "curve": curve,
        "steps": steps,
        "diverged": bool(not np.isfinite(final) or final > DIVERGENCE_FACTOR * initial),
        "lrs": alphas,
    }


def search_lr(
    cfg: NQMConfig | tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    batch_size: int,
    lr_effs: np.ndarray,
    target: float,
    max_steps: int,
    momentum: float = 0.0,
    first_cap: int = 1024,
) -> tuple[float | None, int | None]:
    """Best constant effective learning rate for reaching ``target``: (lr_eff, steps).

    Tries each ε in ``lr_effs`` (step size α = ε (1 − β)) with a constant schedule for at
    most ``max_steps`` steps and returns the ε with the fewest steps to the target (ties: the
    first in ``lr_effs``), or (None, None) if none reaches it.

    Cost control (the answer is the same as an exhaustive search): runs stop at the target;
    the step cap starts at ``first_cap`` and doubles each round until some ε reaches the
    target, so a slow or stuck rate costs at most ~4× the winner's step count in all (caps
    1 + 2 + ... < 2 × last cap < 4 × winner, or first_cap); within a round the cap shrinks to
    the best count so far; for SGD, rates whose provable loss floor
    (:func:`_sgd_loss_floor`) lies above the target are skipped without running.
    """
    h, c, theta0_sq = spectrum(cfg) if isinstance(cfg, NQMConfig) else cfg
    h, c = np.asarray(h, dtype=np.float64), np.asarray(c, dtype=np.float64)
    loss0 = 0.5 * h * np.broadcast_to(theta0_sq, h.shape)
    candidates = []
    for lr in np.asarray(lr_effs, dtype=np.float64).tolist():
        alpha = lr * (1.0 - momentum)
        if momentum == 0.0 and _sgd_loss_floor(h, c, loss0, alpha, batch_size) > target:
            continue  # provably unreachable: skip the full-length run
        candidates.append((lr, alpha))
    cap = min(first_cap, max_steps)
    while candidates:
        best_lr, best_steps = None, None
        for lr, alpha in candidates:
            n_max = cap if best_steps is None else best_steps - 1
            if n_max < 0:
                break
            curve = expected_loss(
                h, c, theta0_sq, np.full(n_max, alpha), batch_size, momentum, stop_at=target
            )
            n = steps_to_target(curve, target)
            if n is not None:
                best_lr, best_steps = lr, n
        if best_steps is not None:
            return best_lr, best_steps
        if cap >= max_steps:
            break
        cap = min(2 * cap, max_steps)
    return None, None


def _sgd_loss_floor(
    h: np.ndarray, c: np.ndarray, loss0: np.ndarray, alpha: float, batch_size: int
) -> float:
    """A lower bound on the expected loss of constant-step SGD at every step t >= 0.

    Per dimension ℓ_t = ℓ_∞ + (1 − αh)^{2t} (ℓ_0 − ℓ_∞) is monotone between ℓ_0 and ℓ_∞, so
    ℓ_t >= min(ℓ_0, ℓ_∞); an unstable dimension (αh >= 2) has ℓ_t >= ℓ_0 (its second moment
    never shrinks). Summing gives the bound.
    """
    ah = alpha * h
    stable = ah < 2.0
    # The inner where keeps the division finite on unstable dimensions (no warnings).
    l_inf = np.where(
        stable, alpha * c / (2.0 * batch_size * np.where(stable, 2.0 - ah, 1.0)), np.inf
    )
    return float(np.sum(np.minimum(loss0, l_inf)))
