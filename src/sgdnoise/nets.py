"""What the run loop trains: one model, or a pack of K models stacked into one.

Both expose the same few operations to sgdnoise.loop, member by member: the losses of a
micro-batch, the backward pass, the optimizer step with each member's learning rate, the
evaluation, a member's state and optimizer state (always in the unpacked format, so either
kind resumes the other's checkpoints), and dropping members that finished.

- `SingleNet` is one run as it always trained: the model (wrapped by DDP over processes),
  `HeavyBall` (bit-identical to torch's SGD), the mean loss of each micro-batch divided by
  the number of micro-batches, evaluation sharded over processes. Its arithmetic is the
  reference the packed path is tested against.
- `StackedNet` holds K members in one packed module (sgdnoise.models.packed): one forward,
  backward and `StackedSGD` step for all of them, each member's examples side by side. A
  pack of plain MLPs trained in fp32 steps without autograd: on the CPU at small batch sizes
  through the C kernel of sgdnoise.models.native_mlp (forward, backward and update of every
  member in one call), else through sgdnoise.models.packed_mlp (the same torch kernels in the same order
  as autograd, without autograd's fixed costs). `StackedNet.kernel` names the path.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sgdnoise.models import native_mlp
from sgdnoise.models.packed import StackedModel
from sgdnoise.models.packed_mlp import PackedMLPStep, mlp_layers
from sgdnoise.optim import HeavyBall, StackedSGD

Autocast = Callable[[], contextlib.AbstractContextManager]


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict, in sorted-name order, with dtypes and shapes."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    x: Any,
    y: torch.Tensor,
    task: str,
    batch: int,
    autocast: Autocast,
    lo: int = 0,
    hi: int | None = None,
) -> torch.Tensor:
    """(3,) float64: summed loss, correct count and examples of rows [lo, hi), in eval mode
    (the caller restores the mode)."""
    hi = len(y) if hi is None else hi
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)
    for i in range(lo, hi, batch):
        xb, yb = x[i : min(i + batch, hi)], y[i : min(i + batch, hi)]
        with autocast():
            out = model(xb)
        out = out.float()
        if task == "reconstruction":
            sums[0] += F.mse_loss(out, xb, reduction="sum") / xb[0].numel()
        else:
            sums[0] += F.cross_entropy(out, yb, reduction="sum")
            sums[1] += (out.argmax(1) == yb).sum()
        sums[2] += len(xb)
    return sums


class SingleNet:
    """One model (DDP-wrapped over processes) and its HeavyBall optimizer."""

    size = 1

    def __init__(self, model: nn.Module, optimizer: HeavyBall, acc: Any, task: str,
                 eval_batch: int):  # fmt: skip
        self.acc, self.task, self.eval_batch = acc, task, eval_batch
        self.processes = acc.num_processes
        self.model = acc.prepare_model(model) if self.processes > 1 else model
        # (unwrap_model asks whether the model is torch.compile'd, which imports
        # torch._dynamo: ~1.3 s of start-up for a model that one process never wraps.)
        self.module = acc.unwrap_model(self.model) if self.processes > 1 else model
        self.optimizer = optimizer
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def accumulating(self, more: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: DDP syncs only the last one."""
        return self.model.no_sync() if more and self.processes > 1 else contextlib.nullcontext()

    def losses(self, x: torch.Tensor, y: torch.Tensor, autocast: Autocast) -> torch.Tensor:
        """(1,): the micro-batch's mean loss; x, y hold one member's examples."""
        with autocast():
            out = self.model(x)
        if self.task == "reconstruction":
            return F.mse_loss(out.float(), x).reshape(1)
        return F.cross_entropy(out.float(), y).reshape(1)

    def backward(self, losses: torch.Tensor, micro_batches: int) -> None:
        loss = losses[0]
        (loss / micro_batches if micro_batches > 1 else loss).backward()

    def grads(self) -> list[torch.Tensor]:
        """Each parameter's gradient with a leading member axis of 1 (views)."""
        return [p.grad.unsqueeze(0) for p in self.params]

    def step(self, lrs: Sequence[float]) -> None:
        self.optimizer.param_groups[0]["lr"] = lrs[0]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self, x: Any, y: torch.Tensor, autocast: Autocast) -> list[tuple[float, float]]:
        """Full-dataset (loss, accuracy) in eval mode, sharded over processes and summed."""
        p, n_proc = self.acc.process_index, self.processes
        lo, hi = p * len(y) // n_proc, (p + 1) * len(y) // n_proc
        was_training = self.module.training
        sums = evaluate_model(self.module, x, y, self.task, self.eval_batch, autocast, lo, hi)
        self.module.train(was_training)
        if n_proc > 1:
            sums = self.acc.reduce(sums, reduction="sum")
        return [((sums[0] / sums[2]).item(), (sums[1] / sums[2]).item())]

    def evaluate_member(self, k: int, x: Any, y: torch.Tensor, autocast: Autocast
                        ) -> tuple[float, float]:  # fmt: skip
        return self.evaluate(x, y, autocast)[0]

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def optimizer_state(self, k: int, lr: float) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def select(self, keep: list[int]) -> None:
        """A single run never leaves members behind: nothing to drop."""


class StackedNet:
    """K members in one packed module, stepped by StackedSGD (one process)."""

    def __init__(self, template: nn.Module, states: Sequence[dict[str, torch.Tensor]],
                 optimizer_states: Sequence[dict[str, Any] | None], momentum: float,
                 weight_decay: float, task: str, eval_batch: int,
                 fp32: bool = True, native: bool = False):  # fmt: skip
        """`fp32`: no autocast (bf16 steps go through autograd, which autocast hooks).
        `native`: a plain MLP may step through the C kernel (the caller checks that the
        parameters are on the CPU and that every step is one micro-batch, which the kernel
        fuses with the update, or micro-batches it sums: `accumulated_step`)."""
        self.task, self.eval_batch = task, eval_batch
        self.stack = StackedModel(template, states)
        layers = mlp_layers(self.stack.module) if fp32 and task == "classification" else None
        self.by_hand = PackedMLPStep(layers) if layers else None
        lib = native_mlp.library() if layers and native and native_mlp.fits(layers) else None
        self.native = native_mlp.NativeMLPStep(lib, layers) if lib and layers else None
        self.kernel = "native" if self.native else "torch" if self.by_hand else "autograd"
        self.optimizer = StackedSGD(self.stack.params, momentum, weight_decay)
        if optimizer_states[0] is not None and optimizer_states[0]["state"]:
            # Resumed members' momentum buffers, stacked in the packed layout.
            self.optimizer.momentum_buffers = [
                self.stack.to_leaf(n, torch.stack([
                    s["state"][i]["momentum_buffer"].to(p.device) for s in optimizer_states
                ])).detach()
                for i, (n, p) in enumerate(zip(self.stack.param_names, self.stack.params,
                                               strict=True))
            ]  # fmt: skip

    @property
    def size(self) -> int:
        return self.stack.size

    @property
    def params(self) -> list[torch.Tensor]:
        return self.stack.params

    def train(self, mode: bool = True) -> None:
        self.stack.train(mode)

    def accumulating(self, more: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def losses(self, x: torch.Tensor, y: torch.Tensor, autocast: Autocast) -> torch.Tensor:
        """(K,): each member's mean loss; x (K·M, ...) and y (K·M,) member-major. Through
        the C kernel the whole step runs in `step`, which fills this tensor in."""
        K = self.size
        if self.native is not None:
            return self.native.losses(x, y, K)
        if self.by_hand is not None:
            return self.by_hand.losses(x, y, K)
        x = x.view(K, -1, *x.shape[1:])
        with autocast():
            out = self.stack(x)
        if self.task == "reconstruction":
            return (out.float() - x).pow(2).reshape(K, -1).mean(1)
        ce = F.cross_entropy(out.float().flatten(0, 1), y, reduction="none")
        return ce.view(K, -1).mean(1)

    def backward(self, losses: torch.Tensor, micro_batches: int) -> None:
        if self.native is not None:
            # Fused with the update in step(): one micro-batch per step, nothing to add up
            # (micro-batches go through accumulated_step).
            if micro_batches != 1:
                raise RuntimeError("the native MLP step takes one micro-batch per step")
            return
        if self.by_hand is not None:
            self.by_hand.backward(micro_batches)
            return
        (losses.sum() / micro_batches if micro_batches > 1 else losses.sum()).backward()

    def grads(self) -> list[torch.Tensor]:
        if self.native is not None:
            raise RuntimeError("the native MLP step keeps no gradients")
        return [p.grad for p in self.params]

    def step(self, lrs: Sequence[float]) -> None:
        if self.native is not None:
            self.native.step(list(lrs), *self._native_optimizer())
            return
        self.optimizer.step(lrs)
        self.optimizer.zero_grad()

    def _native_optimizer(self) -> tuple[float, float, dict[int, torch.Tensor]]:
        """(momentum, weight decay, momentum buffer by id of its parameter) for the kernel."""
        opt = self.optimizer
        opt.ensure_buffers()
        buffers = {id(p): b for p, b in zip(opt.params, opt.momentum_buffers, strict=True)
                   if b is not None}  # fmt: skip
        group = opt.param_groups[0]
        return group["momentum"], group["weight_decay"], buffers

    def accumulated_step(self, x: torch.Tensor, y: torch.Tensor, micro_batches: int,
                         lrs: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """A step of `micro_batches` micro-batches through the C kernel in one call
        (`NativeMLPStep.accumulated_step`): the last micro-batch's losses (K,) and the
        squared gradient norms the noise window adds up (K, 2). Only when `native` is set."""
        if self.native is None:
            raise RuntimeError("a step of summed micro-batches in one call needs the native step")
        return self.native.accumulated_step(x, y, micro_batches, list(lrs),
                                            *self._native_optimizer())  # fmt: skip

    def steps(self, x: torch.Tensor, y: torch.Tensor, streams: list[torch.Tensor],
              stream_of: list[int], lrs: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """T steps through the C kernel in one call (`NativeMLPStep.steps`); the losses of
        each step, (T, K). Only when `native` is set."""
        if self.native is None:
            raise RuntimeError("multi-step calls need the native MLP step")
        return self.native.steps(x, y, streams, stream_of, lrs, *self._native_optimizer())

    @torch.no_grad()
    def evaluate(self, x: Any, y: torch.Tensor, autocast: Autocast) -> list[tuple[float, float]]:
        """Every member on the same examples, in one batched pass per eval batch (through
        the C kernel when the pack steps through it)."""
        K, n, bs = self.size, len(y), self.eval_batch
        if self.native is not None and isinstance(x, torch.Tensor) and x.dtype == torch.float32:
            sums = self.native.evaluate(x, y)
            return [(a / n, c / n) for a, c in sums.tolist()]
        sums = torch.zeros(K, 3, dtype=torch.float64, device=y.device)
        self.stack.train(False)
        for i in range(0, n, bs):
            xb, yb = x[i : i + bs], y[i : i + bs]
            with autocast():
                out = self.stack.shared(xb)
            out = out.float()
            if self.task == "reconstruction":
                err = (out - xb).pow(2).reshape(K, len(xb), -1).sum(2)
                sums[:, 0] += err.sum(1) / xb[0].numel()
            else:
                ce = F.cross_entropy(out.flatten(0, 1), yb.repeat(K), reduction="none")
                sums[:, 0] += ce.view(K, -1).sum(1)
                sums[:, 1] += (out.argmax(-1) == yb).sum(1)
            sums[:, 2] += len(xb)
        self.stack.train(True)
        rates = (sums[:, :2] / sums[:, 2:]).tolist()
        return [(a, b) for a, b in rates]

    def evaluate_member(self, k: int, x: Any, y: torch.Tensor, autocast: Autocast
                        ) -> tuple[float, float]:  # fmt: skip
        """Member k alone, in the template model (a member retiring between evaluations)."""
        model = self.stack.load_member(k)
        sums = evaluate_model(model, x, y, self.task, self.eval_batch, autocast)
        return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        return self.stack.member_state(k)

    def optimizer_state(self, k: int, lr: float) -> dict[str, Any]:
        """Member k's optimizer state in HeavyBall's (torch SGD's) format."""
        opt = self.optimizer
        state = {
            i: {"momentum_buffer": self.stack.view(n, b)[k].clone(
                memory_format=torch.contiguous_format)}
            for i, (n, b) in enumerate(zip(self.stack.param_names, opt.momentum_buffers,
                                           strict=True))
            if b is not None
        }  # fmt: skip
        return {"state": state, "param_groups": [{**opt.param_groups[0], "lr": lr}]}

    def select(self, keep: list[int]) -> None:
        self.stack.select(keep)
        self.optimizer.select(keep, self.stack.params)
        if self.by_hand is not None:
            self.by_hand.forget()
