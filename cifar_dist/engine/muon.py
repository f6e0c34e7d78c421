"""Muon for conv filters and SGD for the rest, in one optimizer (airbench94_muon and its successors).

Muon groups (`"muon": True`) orthogonalise each filter's momentum update with a Newton–Schulz
iteration, after airbench94_muon's `Muon`: buffer `buf = m·buf + g` (not torch.optim.Muon's EMA),
Nesterov update `g + m·buf`, the weight renormalised to norm √(out channels) before the step, NS in
bfloat16 on the filter flattened to (out, in·k·k). From the 2025 record (hiverge cifar10-speedrun):
renormalisation every `normalize_every` steps, growing linearly to `normalize_every_end` over
`total_steps`, and decoupled weight decay after the update. SGD groups (`"muon": False`) run
torch's own SGD, so they are bitwise what torch.optim.SGD does.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor
from torch.optim.sgd import sgd

NS_EPS = 1e-7
# Keller Jordan's quintic, chosen to maximise the slope at zero: singular values land in about
# [0.5, 1.5] rather than at 1, which training does not mind and which takes fewer steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower_newton_schulz(matrices: Tensor, steps: int, coefficients: tuple[float, float, float],
                            eps: float = NS_EPS) -> Tensor:
    """Approximately orthogonalise a (r, c) matrix or each of a (k, r, c) stack; returns bfloat16.

    Each singular value σ of a matrix G goes to f(f(…f(σ/‖G‖_F))), f(x) = a·x + b·x³ + c·x⁵.
    """
    a, b, c = coefficients
    X = matrices.bfloat16()
    # Per-matrix Frobenius norm bounds the top singular value by 1; for one matrix this is
    # bitwise the record's X.norm().
    X /= X.norm(dim=(-2, -1), keepdim=True) + eps
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT  # X Xᵀ is then the smaller Gram matrix
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A  # the record's expression, (c·A)·A, kept for its bf16 rounding
        X = a * X + B @ X
    return X.mT if transposed else X


class Muon(torch.optim.Optimizer):
    """Muon for groups with `"muon": True` (2-D or 4-D weights), torch's SGD for `"muon": False`.

    Group keys, defaults from the constructor:
        muon: which algorithm the group runs.
        lr, momentum, nesterov, weight_decay: both kinds; weight decay is decoupled
            (p ← p·(1 − lr·wd) after the update) in Muon groups, coupled as torch's SGD in SGD groups.
        ns_steps, ns_coefficients: the Newton–Schulz iteration.
        normalize_weights: set each weight to norm √(out channels) before its update, every
            normalize_every steps, the interval growing linearly to normalize_every_end (default:
            normalize_every) at total_steps.
        batched: orthogonalise all updates of one shape together (one batched matmul per shape).
    Muon groups also hold `step` (steps taken) and `last_normalized` (step of the last
    renormalisation), so state_dict() carries the schedule and a resumed run continues bitwise.
    """

    def __init__(self, params, lr: float, momentum: float = 0.6, nesterov: bool = True,
                 ns_steps: int = 3, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 weight_decay: float = 0.0, normalize_weights: bool = True, normalize_every: int = 1,
                 normalize_every_end: int | None = None, total_steps: int | None = None,
                 batched: bool = True, muon: bool = True):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        ns_coefficients=ns_coefficients, weight_decay=weight_decay,
                        normalize_weights=normalize_weights, normalize_every=normalize_every,
                        normalize_every_end=normalize_every_end, total_steps=total_steps,
                        batched=batched, muon=muon)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """torch.optim.Optimizer's, then the group's values checked and its counters started."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["normalize_every_end"] is None:
            group["normalize_every_end"] = group["normalize_every"]
        _check_group(group, len(self.param_groups) - 1)
        if group["muon"]:
            group.setdefault("step", 0)
            group.setdefault("last_normalized", 0)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """One update of every group; `closure` is accepted for the Optimizer interface and ignored."""
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
            else:
                self._sgd_step(group)

    def _sgd_step(self, group: dict) -> None:
        # torch.optim.SGD.step for one group, with dampening 0 and torch's choice of kernel.
        params = [p for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        momentum = group["momentum"]
        buffers = [self.state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
        sgd(params, grads, buffers, has_sparse_grad=any(g.is_sparse for g in grads),
            weight_decay=group["weight_decay"], momentum=momentum, lr=group["lr"], dampening=0.0,
            nesterov=group["nesterov"], maximize=False)
        for p, buffer in zip(params, buffers):  # sgd() creates the buffers on the first step
            self.state[p]["momentum_buffer"] = buffer

    def _muon_step(self, group: dict) -> None:
        group["step"] += 1
        step = group["step"]
        normalize = group["normalize_weights"] and step - group["last_normalized"] >= _interval(group, step)
        if normalize:
            group["last_normalized"] = step
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        params, updates = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            buf = state["momentum_buffer"]
            buf.mul_(momentum).add_(g)
            params.append(p)
            updates.append(g.add(buf, alpha=momentum) if group["nesterov"] else buf)
        if normalize:
            for p in params:
                p.mul_(len(p) ** 0.5 / p.norm())
        orthogonal = _orthogonalise(updates, group["ns_steps"], group["ns_coefficients"], group["batched"])
        for p, u in zip(params, orthogonal):
            p.add_(u.view(p.shape), alpha=-lr)  # bf16 into p's dtype by type promotion, as the record
            if weight_decay > 0:
                p.mul_(1 - lr * weight_decay)


def _interval(group: dict, step: int) -> int:
    """Steps between renormalisations at `step`: the record's 2 + int(15·progress) for 2 → 17."""
    start, end = group["normalize_every"], group["normalize_every_end"]
    if end == start:
        return start
    return start + int((end - start) * step / group["total_steps"])


def _orthogonalise(updates: list[Tensor], steps: int, coefficients, batched: bool) -> list[Tensor]:
    """NS of each update flattened to (out, rest), in the order given; bf16, 2-D each."""
    matrices = [u.reshape(len(u), -1) for u in updates]
    if not batched:
        return [zeropower_newton_schulz(m, steps, coefficients) for m in matrices]
    # Same-shape matrices stacked: exact (no padding changes a norm or a Gram matrix), and one
    # kernel call per shape instead of per tensor.
    by_shape = defaultdict(list)
    for i, m in enumerate(matrices):
        by_shape[(m.shape, m.dtype, m.device)].append(i)
    result = [None] * len(matrices)
    for indices in by_shape.values():
        stacked = zeropower_newton_schulz(torch.stack([matrices[i] for i in indices]), steps, coefficients)
        for i, orthogonal in zip(indices, stacked):
            result[i] = orthogonal
    return result


def _check_group(group: dict, index: int) -> None:
    """ValueError naming the group and the key for a value out of range."""
    where = f"Muon optimizer, parameter group {group.get('name', index)!r}"

    def require(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"{where}: {key} must be {expected}, got {group[key]!r}")

    require(group["lr"] >= 0, "lr", ">= 0")
    require(0 <= group["momentum"] < 1, "momentum", "in [0, 1)")
    require(group["weight_decay"] >= 0, "weight_decay", ">= 0")
    if not group["muon"]:
        return
    for p in group["params"]:
        if p.ndim not in (2, 4):
            raise ValueError(f"{where}: Muon orthogonalises 2-D weights and 4-D conv filters, got a "
                             f"parameter of shape {tuple(p.shape)}; put it in a group with \"muon\": False")
    require(isinstance(group["ns_steps"], int) and group["ns_steps"] >= 1, "ns_steps", "an integer >= 1")
    require(len(group["ns_coefficients"]) == 3, "ns_coefficients", "three numbers (a, b, c)")
    require(isinstance(group["normalize_every"], int) and group["normalize_every"] >= 1,
            "normalize_every", "an integer >= 1")
    require(isinstance(group["normalize_every_end"], int)
            and group["normalize_every_end"] >= group["normalize_every"],
            "normalize_every_end", f"an integer >= normalize_every ({group['normalize_every']})")
    if group["normalize_every_end"] > group["normalize_every"]:
        total = group["total_steps"]
        require(isinstance(total, int) and total >= 1, "total_steps",
                "an integer >= 1 when the renormalisation interval grows (normalize_every_end > normalize_every)")
