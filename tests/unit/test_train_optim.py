"""AdamW in the SPEC's order and the warmup + half-cosine schedule, checked against hand computation."""

import math

import pytest
import torch

from tempme_train.optim import AdamW, build_scheduler, warmup_cosine, warmup_steps


def one_step(optimizer_class, **kwargs) -> float:
    """Value of a single parameter p = 1 after one step with gradient 0.5."""
    param = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    optimizer = optimizer_class([param], **kwargs)
    param.grad = torch.tensor([0.5], dtype=torch.float64)
    optimizer.step()
    return param.item()


def test_adamw_matches_the_spec_formula_on_one_parameter():
    lr, wd, eps, b1, b2 = 0.1, 0.2, 1e-6, 0.9, 0.999
    # By hand: m = 0.1 * 0.5, v = 0.001 * 0.25; bias corrections 1 - 0.9 and 1 - 0.999.
    m, v = 0.05, 0.00025
    step_size = lr * math.sqrt(1 - b2) / (1 - b1)
    after_adam = 1.0 - step_size * m / (math.sqrt(v) + eps)
    expected = after_adam - lr * wd * after_adam  # decay after the update, on the updated value
    got = one_step(AdamW, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    assert got == pytest.approx(expected, abs=1e-12)
    assert got == pytest.approx(0.882006, abs=1e-6)  # 0.98 * (1 - 0.0316228 * 0.05 / 0.0158124)


def test_torch_adamw_differs_by_the_order_of_decay():
    kwargs = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.2)
    ours = one_step(AdamW, **kwargs)
    theirs = one_step(torch.optim.AdamW, **kwargs)
    # torch: p*(1 - lr*wd) - update; ours: (p - update)*(1 - lr*wd). With an update of about 0.1 they
    # differ by about lr*wd*update = 0.002 (the eps placement changes the update in the 6th digit).
    assert theirs - ours == pytest.approx(-0.1 * 0.2 * 0.1, rel=1e-2)


def test_adamw_second_step_uses_running_moments():
    param = torch.nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    optimizer = AdamW([param], lr=1.0, betas=(0.5, 0.5), eps=0.0, weight_decay=0.0)
    for grad in (1.0, 3.0):
        param.grad = torch.tensor([grad], dtype=torch.float64)
        optimizer.step()
    # Step 1: m=0.5, v=0.5, size=sqrt(0.5)/0.5 -> update 1. Step 2: m=1.75, v=4.75, size=sqrt(.75)/.75.
    assert param.item() == pytest.approx(-1.0 - math.sqrt(0.75) / 0.75 * 1.75 / math.sqrt(4.75), abs=1e-12)


def test_schedule_values_by_hand():
    total = 100
    warmup = warmup_steps(total, 0.1)
    assert warmup == 10
    assert warmup_cosine(0, warmup, total) == 0.0  # the first step runs at lr 0
    assert warmup_cosine(5, warmup, total) == 0.5
    assert warmup_cosine(10, warmup, total) == 1.0  # end of warmup
    assert warmup_cosine(55, warmup, total) == pytest.approx(0.5)  # middle of the half cosine
    assert warmup_cosine(100, warmup, total) == pytest.approx(0.0, abs=1e-15)
    assert warmup_steps(7030, 0.1) == 703  # MSRVTT: 1406 steps per epoch x 5


def test_scheduler_steps_the_optimizer_learning_rate():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = AdamW([param], lr=6e-4)
    scheduler = build_scheduler(optimizer, total_steps=100, warmup_fraction=0.1)
    rates = []
    for _ in range(101):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.0 and rates[10] == pytest.approx(6e-4) and rates[55] == pytest.approx(3e-4)
    assert rates[100] == pytest.approx(0.0, abs=1e-15)
