"""A packed plain MLP's whole training step in a small C kernel (sgdnoise/native/mlp_step.c).

At B = 4 … 32 a member's step of the default MLP is a few matrix products with 4 to 32 rows:
torch's batched kernels run those at about a quarter of the CPU's peak, and the gradient,
momentum and update then stream every weight through memory three more times. The kernel
runs a member's forward pass, backward pass and update back to back while its weights are
in the caches, multiplies with register-blocked loops, applies the weight gradient 6 rows
at a time as soon as they are summed (never storing it whole), and takes the whole pack's
step in one call instead of some thirty torch operations; a call of several steps runs
them member by member, each member's steps back to back while its weights and momentum stay
in L2. Larger batches run in chunks of rows whose activations stay in L2, the 10-class
output layer's backward pass runs along its input's width, and a pack's evaluations run in
C as well. With gradient accumulation, one call takes a whole step of micro-batches and
returns the squared gradient norms the gradient noise scale is estimated from.
`benchmarks/member_step.py --compare-native` measures it against the torch path,
`--kernel-only` against the CPU's peak, `benchmarks/large_batch.py` whole large-batch runs.

The kernel computes the same math as sgdnoise.models.packed_mlp (forward, cross-entropy,
backward, heavy-ball SGD with L2) with sums in another order: a member's parameters agree
with its unpacked run to float rounding amplified by training, within the tolerance that
tests/test_pack.py states for every packed run (tests/test_native_mlp.py checks it against
the torch path as well).

It is compiled on first use (sgdnoise.native). With no C compiler, or with
SGDNOISE_NATIVE=0, packs take the torch path; each run records which one trained it (the
param `derived.step_kernel`).
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from sgdnoise import native
from sgdnoise.models.packed import PackedLinear

# The kernel keeps each layer's input pointer and a layer's column strips in fixed arrays.
MAX_LAYERS, MAX_WIDTH = 63, 65_536
# Micro-batches it sums take its blocked backward pass, which stores a gradient: more than
# FUSED_MAX_N (8) rows each (fewer fuse the update into the backward pass).
MIN_MICRO = 9


def fits(layers: list[PackedLinear]) -> bool:
    """Whether the kernel takes this MLP (else the pack keeps the torch path)."""
    return len(layers) <= MAX_LAYERS and max(layer.weight.shape[2] for layer in layers) <= MAX_WIDTH


def library() -> Any:
    """The kernel's ctypes library, or None (sgdnoise.native)."""
    return native.library("mlp_step")


def _pointers(tensors: list[torch.Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() if t is not None else None
                                              for t in tensors])  # fmt: skip


class NativeMLPStep:
    """`losses` (forward) and `step` (backward and update, fused), or `steps` (several
    whole steps in one call), or `accumulated_step` (a step in micro-batches), for the pack
    of MLPs whose Linear layers are `layers`, on the CPU in fp32."""

    def __init__(self, lib: Any, layers: list[PackedLinear]):
        if not fits(layers):
            raise ValueError(f"at most {MAX_LAYERS} layers of at most {MAX_WIDTH} units")
        self.lib, self.layers = lib, layers
        dims = [layers[0].weight.shape[1]] + [layer.weight.shape[2] for layer in layers]
        self._dims = (ctypes.c_int64 * len(dims))(*dims)
        self._ws = self._grads = torch.empty(0)
        self._x = self._y = self._losses = torch.empty(0)
        self._views: tuple[tuple[int, ...], tuple[ctypes.Array, ...]] = ((), ())

    @property
    def L(self) -> int:
        return len(self.layers)

    def _params(self, buffers: dict[int, torch.Tensor], momentum: float
                ) -> tuple[ctypes.Array, ...]:  # fmt: skip
        """Pointer arrays of the weights, the biases and their momentum buffers (cached while
        the tensors stay the same objects; members retiring replace them)."""
        if momentum and any(id(layer.weight) not in buffers for layer in self.layers):
            raise RuntimeError("heavy ball needs every weight's momentum buffer")
        ws = [layer.weight for layer in self.layers]
        bs = [layer.bias for layer in self.layers]
        vw = [buffers.get(id(w)) for w in ws]
        vb = [buffers.get(id(b)) if b is not None else None for b in bs]
        tensors = [ws, bs, vw, vb]
        key = tuple(id(t) for ts in tensors for t in ts)
        if self._views[0] != key:
            for t in (t for ts in tensors for t in ts):
                assert t is None or (t.is_contiguous() and t.dtype == torch.float32)
            self._views = (key, tuple(_pointers(ts) for ts in tensors))
        return self._views[1]

    def losses(self, x: torch.Tensor, y: torch.Tensor, K: int) -> torch.Tensor:
        """(K,): each member's mean cross-entropy on x (K·n, ...) and y (K·n,), member-major.
        The kernel runs the forward pass together with the backward pass and the update, so
        the tensor returned here holds NaN until `step` fills it (the loop reads a step's
        losses after the step)."""
        self._x, self._y = x.reshape(len(y), -1).contiguous(), y.contiguous()
        self._losses = torch.full((K,), float("nan"))
        return self._losses

    @torch.no_grad()
    def step(self, lrs: list[float], momentum: float, weight_decay: float,
             buffers: dict[int, torch.Tensor]) -> None:  # fmt: skip
        """Forward, backward and update of every member on the batch given to `losses`;
        `buffers`: momentum buffer by id of its parameter (empty for plain SGD)."""
        K = len(lrs)
        if self._losses.numel() != K or len(self._y) == 0 or len(self._y) % K:
            raise RuntimeError("step() needs the batch of a losses() call for its K members")
        n = len(self._y) // K
        ws = self._workspace(n)
        W, b, V, vb = self._params(buffers, momentum)
        rates = (ctypes.c_float * K)(*lrs)
        self.lib.sgdn_mlp_step(
            K, n, self.L, self._dims, W, b, V, vb, self._x.data_ptr(), self._y.data_ptr(),
            ws.data_ptr(), rates, momentum, weight_decay, self._losses.data_ptr(),
        )  # fmt: skip
        self._x = self._y = torch.empty(0)

    @torch.no_grad()
    def accumulated_step(self, x: torch.Tensor, y: torch.Tensor, J: int, lrs: list[float],
                         momentum: float, weight_decay: float,
                         buffers: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """One step of every member in J micro-batches, in one call: x (K·J·n, ...) and y
        member-major, each member's rows its micro-batches in order (n rows each, at least
        MIN_MICRO). The step is that of the whole batch (the mean of the micro-batches'
        gradients); returns the last micro-batch's losses (K,) and, for the gradient noise
        scale, each member's summed squared norms of its micro-batches' gradients and the
        squared norm of their mean (K, 2), in float64."""
        K = len(lrs)
        n = len(y) // (K * J) if K and J else 0
        if n * K * J != len(y) or n < MIN_MICRO:
            raise ValueError(f"J micro-batches of at least {MIN_MICRO} rows per member")
        x = x.reshape(len(y), -1).contiguous()
        y = y.to(torch.int64).contiguous()
        ws = self._workspace(n)
        need = self.lib.sgdn_mlp_grad_floats(self.L, self._dims)
        if self._grads.numel() < need:
            self._grads = torch.empty(need)
        W, b, V, vb = self._params(buffers, momentum)
        losses, sq = torch.empty(K), torch.empty(K, 2, dtype=torch.float64)
        self.lib.sgdn_mlp_accum_step(
            K, J, n, self.L, self._dims, W, b, V, vb, x.data_ptr(), y.data_ptr(), ws.data_ptr(),
            self._grads.data_ptr(), (ctypes.c_float * K)(*lrs), momentum, weight_decay,
            losses.data_ptr(), sq.data_ptr(),
        )  # fmt: skip
        return losses, sq

    def _workspace(self, n: int | None) -> torch.Tensor:
        """Scratch for a step of n rows per member (None: for an evaluation)."""
        if n is None:
            need = self.lib.sgdn_mlp_eval_ws_floats(self.L, self._dims)
        else:
            need = self.lib.sgdn_mlp_ws_floats(n, self.L, self._dims)
        if self._ws.numel() < need:
            self._ws = torch.empty(need)
        return self._ws

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(K, 2) float64: every member's summed cross-entropy and number of correct
        predictions on the examples x (n, ...), y (n,), shared by all members. The forward
        pass runs member by member over chunks of rows while the member's weights stay in
        L2 (torch's batched products run the 10-class output layer at a tenth of the peak)."""
        x = x.reshape(len(y), -1).contiguous()
        y = y.to(torch.int64).contiguous()
        K = self.layers[0].weight.shape[0]
        sums = torch.zeros(K, 2, dtype=torch.float64)
        W = _pointers([layer.weight for layer in self.layers])
        b = _pointers([layer.bias for layer in self.layers])
        self.lib.sgdn_mlp_eval(K, len(y), self.L, self._dims, W, b, x.data_ptr(), y.data_ptr(),
                               self._workspace(None).data_ptr(), sums.data_ptr())  # fmt: skip
        return sums

    @torch.no_grad()
    def steps(self, X: torch.Tensor, Y: torch.Tensor, streams: list[torch.Tensor],
              stream_of: list[int], lrs: torch.Tensor, momentum: float, weight_decay: float,
              buffers: dict[int, torch.Tensor]) -> torch.Tensor:  # fmt: skip
        """T steps of every member in one call, each the same as a `losses` and `step` pair
        on its batch (member by member: the members are independent, so the order changes
        no bit): member k's batch of step t is rows streams[stream_of[k]][t·n : (t+1)·n]
        of X (N, ...) and Y (N,). lrs (T, K): the learning rates. Returns the losses (T, K)."""
        T, K = lrs.shape
        n = len(streams[0]) // T
        if any(len(s) != T * n for s in streams) or len(stream_of) != K or n == 0:
            raise ValueError("every stream holds T batches, one stream per member's seed")
        X = X.reshape(len(X), -1)
        assert X.dtype == torch.float32 and X.is_contiguous() and Y.dtype == torch.int64
        idx = [s.to(torch.int64).contiguous() for s in streams]
        rows = (ctypes.c_int64 * K)(*stream_of)
        xb, yb = torch.empty(K * n, X.shape[1]), torch.empty(K * n, dtype=torch.int64)
        lrs = lrs.to(torch.float32).contiguous()
        losses = torch.empty(T, K)
        W, b, V, vb = self._params(buffers, momentum)
        self.lib.sgdn_mlp_steps(
            T, K, n, self.L, self._dims, W, b, V, vb, X.data_ptr(), Y.data_ptr(),
            _pointers(idx), rows, xb.data_ptr(), yb.data_ptr(), self._workspace(n).data_ptr(),
            lrs.data_ptr(), momentum, weight_decay, losses.data_ptr(),
        )  # fmt: skip
        return losses
