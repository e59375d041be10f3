"""Optimizer and learning-rate schedule of the paper's recipe (SPEC section 6).

``AdamW`` follows the Hugging Face ``transformers`` formulation the reference uses. It differs from
``torch.optim.AdamW`` in two small ways, both second order in the learning rate:

* torch decays *before* the Adam update (``p *= 1 - lr*wd``, then the update); here the decay comes
  *after* it and uses the updated value (``p -= lr*wd*p``), so the two differ by ``lr*wd*update``;
* torch divides ``sqrt(v)`` by its bias correction before adding eps; here eps is added to the raw
  ``sqrt(v)`` and the bias corrections are folded into the step size, so torch's effective eps is
  ``eps * sqrt(1 - beta2^t)`` in these units.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay applied after the update, HF style.

    For each parameter ``p`` with gradient ``g`` at step ``t`` (1-based)::

        m = beta1*m + (1-beta1)*g
        v = beta2*v + (1-beta2)*g^2
        p -= lr * sqrt(1-beta2^t)/(1-beta1^t) * m / (sqrt(v) + eps)
        p -= lr * wd * p
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 6e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.2,
    ):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                self._update(param, group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        return loss

    def _update(self, param: torch.Tensor, lr: float, beta1: float, beta2: float, eps: float, decay: float) -> None:
        grad = param.grad
        if grad.is_sparse:
            raise RuntimeError("AdamW does not support sparse gradients")
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step = state["step"]
        step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-step_size)
        if decay > 0.0:
            param.add_(param, alpha=-lr * decay)


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    """``int(fraction * total)``: 703 of MSRVTT's 7030 steps."""
    return int(warmup_fraction * total_steps)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier at ``step`` (0-based, the number of steps already taken).

    Linear from 0 to 1 over ``warmup`` steps, then half a cosine from 1 down to 0 at ``total``.
    """
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(params: Iterable[torch.nn.Parameter], lr: float, betas, eps: float, weight_decay: float) -> AdamW:
    """One parameter group with the same decay for every trainable parameter, as the paper."""
    params = list(params)
    if not params:
        raise ValueError("there are no trainable parameters to optimize")
    return AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float) -> LambdaLR:
    """Warmup + half-cosine, stepped once per optimizer step."""
    warmup = warmup_steps(total_steps, warmup_fraction)
    return LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total_steps))
