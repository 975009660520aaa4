"""Non-finite guard (`trainer.nonfinite`): a NaN/Inf loss or gradient never reaches the weights.

Before every optimizer step the guard checks the step's losses and gradients. Every rank takes
part in the decision (one all-reduce), so all ranks stop or skip together. `stop` raises
`NonFiniteError` with one line naming the step, the batch (sample indices and their records'
origins), the non-finite loss terms (LM loss, or an auxiliary loss with its MoE layer), the first
module whose forward output was non-finite (found by re-running that batch's forward with hooks)
and the parameters with non-finite gradients. `skip` drops the step's gradients instead (no
weight moves; the learning-rate schedule moves on), restores the floating-point buffers (BatchNorm
running statistics) the non-finite forward changed, warns, and counts skipped steps in
`train/nonfinite_skipped`. The weights of the last checkpoint are always finite.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import nn

from asymoe.config import ConfigError

SHOWN = 3  # origins / parameters named in the one-line report


class NonFiniteError(ConfigError):
    """A non-finite loss or gradient stopped training; reported as one line like a config error, since the
    usual causes (learning rate, precision, data) are set by the user."""


def _is_finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value.detach()).all())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (the full tensor of anything else)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def nonfinite_loss_terms(lm_loss: torch.Tensor | None, model: nn.Module) -> list[str]:
    """The non-finite terms of the training loss: the LM loss, auxiliary losses (each with its MoE layer)."""
    terms = [] if lm_loss is None or _is_finite(lm_loss) else [f"lm_loss ({lm_loss.item()})"]
    for layer, record in sorted(model.moe_state.records.items()):
        terms += [f"{name} (MoE layer {layer})" for name, value in record.losses.items() if not _is_finite(value)]
    return terms


def nonfinite_gradients(module: nn.Module) -> list[str]:
    """Names of the parameters whose gradient (this rank's shard) holds a NaN or Inf.

    One device sync for the whole model (the per-parameter flags are stacked first).
    """
    named = [(name, param.grad) for name, param in module.named_parameters() if param.grad is not None]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(_local(grad)).all() for _, grad in named])
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def first_nonfinite_module(model: nn.Module, run_forward: Callable[[], object], prefix: str = "model") -> str | None:
    """The first module (in execution order) whose forward output is non-finite, by re-running the forward.

    Forward hooks fire when a module finishes, so the first report is the innermost module that
    produced the first non-finite value. Names carry `prefix` (the model's name in the training
    module), so they read like the parameter names.
    """
    found: list[str] = []

    def hook(name: str):
        def check(_module, _inputs, output) -> None:
            tensors = output if isinstance(output, (tuple, list)) else (output,)
            if not found and any(torch.is_tensor(t) and t.is_floating_point() and not _is_finite(t) for t in tensors):
                found.append(name)

        return check

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules(prefix=prefix)]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


class NonFiniteGuard(L.Callback):
    """Stops or skips an optimizer step whose loss or gradients are non-finite (module docstring).

    `batch_indices()` gives the sample indices of the batch being trained on and `origins` the
    "file:index" of every training sample, so the report names the records.
    """

    def __init__(self, mode: str, batch_indices: Callable[[], Sequence[int]], origins: Sequence[str]):
        assert mode in ("stop", "skip"), mode
        self.mode = mode
        self.batch_indices = batch_indices
        self.origins = origins
        self.skipped = 0
        self._batch: dict | None = None
        self._batch_desc = ""
        self._bad_terms: list[str] = []
        self._buffers: dict[str, torch.Tensor] = {}
        self._lm_loss: torch.Tensor | None = None  # of the last forward, kept by a hook on the model
        self._hook = None

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._bad_terms:  # keep the first bad micro-batch of an accumulation window
            self._batch = batch
            self._batch_desc = self._describe(trainer, batch_idx)
            if self.mode == "skip":
                # A non-finite forward also poisons BatchNorm running statistics: a skipped step restores them.
                self._buffers = {
                    name: b.detach().clone() for name, b in pl_module.named_buffers() if b.is_floating_point()
                }

    def _describe(self, trainer, batch_idx: int) -> str:
        indices = list(self.batch_indices())
        more = ", ..." if len(indices) > SHOWN else ""
        shown = ", ".join(map(str, indices[:SHOWN])) + more
        origins = ", ".join(self.origins[i] for i in indices[:SHOWN]) + more
        where = f"epoch {trainer.current_epoch}, batch {batch_idx}, rank {trainer.global_rank}"
        return f"{where}: {len(indices)} samples [{shown}] ({origins})"

    def on_fit_start(self, trainer, pl_module) -> None:
        def keep_lm_loss(_module, _inputs, output) -> None:
            lm_loss = getattr(output, "lm_loss", None)
            self._lm_loss = None if lm_loss is None else lm_loss.detach()

        self._hook = pl_module.model.register_forward_hook(keep_lm_loss)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._hook.remove()

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not self._bad_terms and not _is_finite(loss):
            self._bad_terms = nonfinite_loss_terms(self._lm_loss, pl_module.model) or ["the total loss"]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bad_gradients = nonfinite_gradients(pl_module)
        local_bad = bool(self._bad_terms or bad_gradients)
        if trainer.strategy.reduce_boolean_decision(local_bad, all=False):
            if self.mode == "skip":
                self._skip(trainer, pl_module, optimizer, bad_gradients)
            else:
                raise NonFiniteError(self._report(trainer, pl_module, bad_gradients, local_bad))
        self._bad_terms = []

    def _skip(self, trainer, pl_module, optimizer, bad_gradients: list[str]) -> None:
        optimizer.zero_grad(set_to_none=True)  # no parameter has a gradient: the optimizer moves none
        buffers = dict(pl_module.named_buffers())
        with torch.no_grad():
            for name, saved in self._buffers.items():
                buffers[name].copy_(saved)
        self.skipped += 1
        if trainer.global_rank == 0:
            what = ", ".join(self._bad_terms) or f"gradients of {len(bad_gradients)} parameter(s)"
            print(f"asymoe: skipped step {trainer.global_step + 1}: non-finite {what}", file=sys.stderr)
        pl_module.log("train/nonfinite_skipped", float(self.skipped), rank_zero_only=True)
        self._bad_terms = []

    def _report(self, trainer, pl_module, bad_gradients: list[str], local_bad: bool) -> str:
        step = trainer.global_step + 1
        batch = self._batch
        # Every rank re-runs its forward: under FSDP the forward is a collective.
        module = first_nonfinite_module(pl_module.model, lambda: pl_module._forward(batch)) if batch else None
        if not local_bad:
            return f"non-finite loss or gradients at step {step} on another rank (this rank: {self._batch_desc})"
        parts = [f"non-finite {'loss' if self._bad_terms else 'gradients'} at step {step} ({self._batch_desc})"]
        if self._bad_terms:
            parts.append(f"non-finite terms: {', '.join(self._bad_terms)}")
        if module:
            parts.append(f"first non-finite output: {module}")
        if bad_gradients:
            more = ", ..." if len(bad_gradients) > SHOWN else ""
            parts.append(
                f"{len(bad_gradients)} parameter(s) with non-finite gradients: {', '.join(bad_gradients[:SHOWN])}{more}"
            )
        parts.append("the weights are those before this step; set trainer.nonfinite=skip to skip such steps")
        return "; ".join(parts)
