"""checks: the kernel machine's self-checks — the certificate of its exactness on queries (per-step quadrature
residuals), the update residual of the recording (the recorded steps against the steps the machine's coefficients
imply, no query needed), and the comparison of stored with recomputed loss derivatives.

:class:`SelfChecks` is a mixin of :class:`pkfast.KernelMachine`; it reads the machine's functional model
(``fm``), sweep (``_sweeper``), trajectory, recording, batches, targets and loss.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from pkfast.engine.quadrature import EvalPoint
from pkfast.machine.directional import Directional
from pkfast.trajectory.recording import OptimizerKind

__all__ = ["Certificate", "SelfChecks", "UPDATE_TOL"]

_FN = "pkfast.KernelMachine"
#: The largest relative update residual ‖Δ_s − Δ̂_s‖/‖Δ_s‖ a step may show before the machine refuses the
#: recording (:meth:`KernelMachine.verify`). Complete float64 recordings show ~1e-14, float32 ones ~1e-6; the
#: unrecorded training events seen in practice (clipping, accumulation, shuffled X_train, Adam read as SGD)
#: show 0.04–14.
UPDATE_TOL = 1e-3


@dataclass
class Certificate:
    """How exact the kernel machine is on some queries (:meth:`KernelMachine.certificate`).

    Attributes:
        quadrature: ``[T, M, C]`` per-step residual r_s(x) = f(x; w_{s+1}) − f(x; w_s) − J̄_s(x) Δ_s (the
            quadrature error of the segment integral; 0 up to rounding for exact quadrature).
        update: ``[T]`` relative error ‖Δ_s − Δ̂_s‖ / ‖Δ_s‖ between the recorded step and the step recomputed
            from the batch gradients and the optimizer's rule (≈ rounding when the recording is complete;
            large when something unrecorded — clipping, noise, another loss — moved the weights).
        max_quadrature: max |r_s(x)| relative to max |f(x; w_T) − f(x; w_0)|.
    """

    quadrature: torch.Tensor
    update: torch.Tensor
    max_quadrature: float


class SelfChecks:
    """The self-checks of :class:`pkfast.KernelMachine` (a mixin: the machine supplies the model and recording)."""

    def certificate(self, X: Any) -> Certificate:
        """How exact the machine is on the queries ``X``: per-step quadrature residuals and the update residual.

        For each step s the residual r_s(x) = f(x; w_{s+1}) − f(x; w_s) − Σ_q ω_q J(x; w_s + τ_q Δ_s) Δ_s is the
        error of the machine's quadrature of that segment (two forward passes and one directional derivative per
        node; on attention models whose fused kernels have no forward-mode derivative, the derivative runs on
        the math attention path or as double backward, :mod:`pkfast.machine.directional`). With the update
        residual near rounding, the machine's prediction error at x is Σ_s r_s(x).

        Returns:
            a :class:`Certificate` (the update residual is measured on the first call if ``verify=False``).

        Example:
            >>> cert = km.certificate(Xq)  # doctest: +SKIP
            >>> cert.quadrature.shape, cert.max_quadrature  # doctest: +SKIP
            (torch.Size([5, 2, 3]), 3.1e-07)
        """
        X = self._queries(X)
        fm = self.fm
        Xd = fm.prepare(X)
        quad = []
        f_prev = fm.outputs(EvalPoint(0), X)
        f0 = f_prev
        for s in range(self.trajectory.num_steps):
            f_next = fm.outputs(EvalPoint(s + 1), X)
            quad.append(f_next - f_prev - self._segment_linear(Xd, X.shape[0], s, self._sweeper.combo(s)))
            f_prev = f_next
        quad_t = torch.stack(quad).cpu()
        scale = float((f_prev - f0).abs().max()) or 1.0
        if self.update_residual is None:
            self.update_residual = self._update_residuals()
        return Certificate(quad_t, self.update_residual, float(quad_t.abs().max()) / scale)

    def _segment_linear(self, Xd: torch.Tensor, M: int, s: int, combo) -> torch.Tensor:
        """``[M, C]``: Σ_q ω_q J(x; w_s + τ_q Δ_s) Δ_s over the (point, weight) pairs of ``combo`` for the prepared
        queries ``Xd`` — the machine's linearisation of step s."""
        fm = self.fm
        if getattr(self, "_directional", None) is None:
            self._directional = Directional()
        delta = fm.state(EvalPoint(s + 1))[0] - fm.state(EvalPoint(s))[0]
        lin = None
        for point, om in combo:
            flat, statics = fm.state(point)

            def f(p, statics=statics):
                return functional_call(fm.model, (fm.params(p), statics), (Xd,)).reshape(M, -1)

            t = om * self._directional(f, flat, delta)
            lin = t if lin is None else lin + t
        return lin

    def verify(self, tol: float = None) -> torch.Tensor:
        """Check that the recorded steps are the steps this machine's coefficients imply; refuse if not.

        Each recorded update Δ_s = w_{s+1} − w_s is compared with the update Δ̂_s recomputed from the recorded
        batches, targets, loss and optimizer settings (no query needed: one batch gradient per step, the cost of
        replaying training once). Where ‖Δ_s − Δ̂_s‖/‖Δ_s‖ exceeds ``tol`` (default :data:`UPDATE_TOL`, raised to
        the storage dtype's rounding where weights were stored in low precision) on any step, the decomposition
        would not reproduce the network, so this raises with what it found and the likely causes. Called by the
        constructor unless ``verify=False``.

        Returns:
            ``[T]`` the relative update residual per step (also kept as :attr:`update_residual`).

        Example:
            >>> km.verify()  # doctest: +SKIP
            tensor([3.1e-16, 2.9e-16, ...], dtype=torch.float64)
        """
        tol = UPDATE_TOL if tol is None else float(tol)
        res = self._update_residuals()
        self.update_residual = res
        allowed = torch.clamp(self._rounding_floor(), min=tol)
        bad = torch.nonzero(~(res <= allowed)).flatten().tolist()
        if bad:
            raise ValueError(self._refusal(res, bad, tol))
        return res

    def _rounding_floor(self) -> torch.Tensor:
        """``[T]`` the update residual that storing the weights in the trajectory's dtype alone can cause:
        8 u ‖w_{s+1}‖ / ‖Δ_s‖ (each stored weight is within u |w| of the trained one)."""
        u = torch.finfo(self.trajectory.dtype).eps
        out = []
        for s in range(self.trajectory.num_steps):
            w0, w1 = self.fm.state(EvalPoint(s))[0], self.fm.state(EvalPoint(s + 1))[0]
            out.append(float(8 * u * w1.norm() / (w1 - w0).norm().clamp_min(1e-300)))
        return torch.tensor(out, dtype=torch.float64)

    def _refusal(self, res: torch.Tensor, bad: list[int], tol: float) -> str:
        worst = int(torch.nan_to_num(res, nan=float("inf")).argmax())
        rec = self._record
        causes = ["gradient clipping (clip_grad_norm_ between backward and step) or gradient noise that the "
                  "recording does not show",
                  "gradient accumulation over micro-batches (several backward passes per optimizer step)",
                  "X_train or y_train in another order than the recorded batch indices, or other data",
                  "a loss other than the recorded one (reduction, label smoothing, class weights, extra terms)",
                  "a training forward pass unlike the model's (dropout, data augmentation, train-mode normalisation)"]
        if rec.optimizer is not None and rec.optimizer.kind.adaptive:
            causes.insert(0, "a recorded preconditioner that is not the one the optimizer applied (an edited or "
                             "damaged state file, or an optimizer changed in the loop)")
        elif rec.optimizer is None or rec.optimizer.kind is not OptimizerKind.SGD:
            causes.insert(0, "an optimizer other than plain SGD (a trajectory from checkpoints with lr= is taken as "
                             "plain SGD; for Adam/AdamW/RMSprop/Adagrad record the run with pkfast.TrajectoryRecorder, "
                             "whose per-step preconditioner makes the machine exact)")
        return (f"{_FN}: the recorded weights do not follow from the recorded training: the update residual "
                f"‖Δ_s − Δ̂_s‖/‖Δ_s‖ exceeds {tol:g} on {len(bad)} of {len(res)} steps (worst {float(res[worst]):.3g} "
                f"at step {worst}; first bad step {bad[0]}), so the kernel machine would not reproduce the network. "
                "Likely causes: " + "; ".join(causes) + ". Fix the recording (TrajectoryRecorder around the "
                "real loop, the same X_train order and loss), or pass verify=False to build the machine anyway "
                "(its predictions then differ from the network; certificate() shows by how much)")

    def _warn_output_grad_mismatch(self) -> None:
        """Warn (at the constructor's caller) where the stored loss derivatives differ from the recomputed ones."""
        if self.output_grad_mismatch is None:
            return
        worst = float(torch.nan_to_num(self.output_grad_mismatch, nan=0.0).max())
        if worst > 1e-6:
            warnings.warn(
                f"{_FN}: the loss derivatives recorded during training differ from those recomputed from the model "
                f"by up to {worst:.2e} (relative): the training forward pass was not the model's (data "
                "augmentation, dropout or train-mode normalisation?), so the kernel machine reproduces the "
                "trajectory's weights through the model's own gradients, not the training run's",
                stacklevel=3)

    def _output_grad_mismatch(self) -> torch.Tensor | None:
        T = self.trajectory.num_steps
        stored = [None if st.output_grads is None else torch.from_numpy(st.output_grads.copy())
                  for st in self._record.steps]
        if all(g is None for g in stored):
            return None
        out = torch.full((T,), float("nan"), dtype=torch.float64)
        for s, g in enumerate(stored):
            b = self._batches[s]
            if g is None or b.numel() == 0:
                continue
            if g.shape != (b.numel(), self.C):
                raise ValueError(f"{_FN}: step {s} stored output gradients of shape {tuple(g.shape)}; expected "
                                 f"({b.numel()}, {self.C}) for its batch of {b.numel()}")
            f = self.fm.outputs(EvalPoint(s), self.X[b]).to("cpu", torch.float64)
            rec = self.loss.output_grad(f, self.y[b], self.fm.output_shape)
            out[s] = float((rec - g).abs().max() / g.abs().max().clamp_min(1e-300))
        return out

    def _update_residuals(self) -> torch.Tensor:
        """``[T]`` ‖Δ_s − Δ̂_s‖/‖Δ_s‖ through the sweep's own coefficients — the one statement of the optimizer's
        rule, the one the decomposition uses (:meth:`Sweep.update_residuals`, :meth:`AdaptiveSweep.update_residuals`)."""
        return self._sweeper.update_residuals()
