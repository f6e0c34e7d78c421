"""Muon (cifar_dist/engine/muon.py): Newton–Schulz against an SVD and the record, one step by hand,
against torch.optim.Muon, SGD groups against torch.optim.SGD, batching, the renormalisation
schedule, state_dict resume, argument checks."""
from __future__ import annotations

import io

import pytest
import torch

from cifar_dist.engine.muon import NS_COEFFICIENTS, Muon, zeropower_newton_schulz


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def leaf(tensor: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(tensor.clone())


def run(optimizer, params, grads_per_step) -> None:
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


# --- Newton–Schulz ------------------------------------------------------------------------------

def quintic_map(x: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


@pytest.mark.parametrize("steps", [3, 5])
@pytest.mark.parametrize("rows, cols", [(32, 48), (48, 32)])
def test_newton_schulz_maps_singular_values_by_the_quintic(rows, cols, steps):
    # G = U S Vᵀ with S spread over [0.5, 2]; NS(G) should be U f(S/‖G‖_F) Vᵀ, f the quintic applied
    # `steps` times, so Uᵀ NS(G) V is diagonal with those entries (up to bf16 arithmetic).
    k = min(rows, cols)
    u, _ = torch.linalg.qr(randn(rows, rows, seed=1).double())
    v, _ = torch.linalg.qr(randn(cols, cols, seed=2).double())
    u, v = u[:, :k], v[:, :k]
    singular = torch.linspace(0.5, 2.0, k, dtype=torch.float64)
    g = (u @ torch.diag(singular) @ v.T).float()

    rotated = u.T @ zeropower_newton_schulz(g, steps, NS_COEFFICIENTS).double() @ v
    diagonal = rotated.diagonal()
    off_diagonal = rotated - torch.diag(diagonal)
    # bf16's unit roundoff is 2⁻⁸ ≈ 0.004; each iteration adds a few of it (measured here: off-diagonal
    # 0.02 after 3 steps, 0.035 after 5; diagonal at most 0.02 and 0.05 from the map).
    assert (off_diagonal.norm() / diagonal.norm()).item() < 0.01 * steps
    expected = quintic_map(singular / singular.norm(), steps)
    # The quintic does not converge to 1: it leaves singular values spread around it (the record's
    # "S' ~ Uniform(0.5, 1.5)"; 0.68 to 1.08 after 3 steps here, 0.68 to 1.13 after 5), so the
    # check is entry by entry against that spread, not against 1. One iteration more or fewer moves
    # the small singular values by more than 0.1.
    assert (diagonal - expected).abs().max().item() < 0.015 * steps
    assert expected.max() - expected.min() > 0.3


def record_newton_schulz(G, steps=3, eps=1e-7):
    # airbench94_muon.py's zeropower_via_newtonschulz5, verbatim but for @torch.compile.
    a, b, c = (3.4445, -4.7750,  2.0315)
    X = G.bfloat16()
    X /= (X.norm() + eps)  # ensure top singular value <= 1
    if G.size(0) > G.size(1):
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(0) > G.size(1):
        X = X.T
    return X


@pytest.mark.parametrize("shape", [(16, 40), (40, 16)])
def test_newton_schulz_is_the_records_and_batches_per_matrix(shape):
    first, second = randn(*shape, seed=3), 10 * randn(*shape, seed=4)
    assert torch.equal(zeropower_newton_schulz(first, 3, NS_COEFFICIENTS), record_newton_schulz(first))
    # Stacked, each matrix gets its own norm: the result is the record's for each, within bf16.
    stacked = zeropower_newton_schulz(torch.stack([first, second]), 3, NS_COEFFICIENTS)
    assert stacked.dtype == torch.bfloat16 and stacked.shape == (2, *shape)
    for out, matrix in zip(stacked, [first, second]):
        assert relative_error(out.float(), record_newton_schulz(matrix).float()) < 1e-2


# --- Muon groups --------------------------------------------------------------------------------

def test_two_steps_by_hand():
    lr, momentum, decay = 0.1, 0.6, 0.05
    start = randn(4, 3, 1, 1, seed=5)
    grads = [randn(4, 3, 1, 1, seed=6), randn(4, 3, 1, 1, seed=7)]
    param = leaf(start)
    optimizer = Muon([param], lr=lr, momentum=momentum, weight_decay=decay)
    run(optimizer, [param], [[g] for g in grads])

    weight, buf = start.clone(), torch.zeros_like(start)
    for g in grads:
        buf = momentum * buf + g
        update = g + momentum * buf  # Nesterov
        weight = weight * (2.0 / weight.norm())  # √(4 out channels)
        orthogonal = zeropower_newton_schulz(update.reshape(4, 3), 3, NS_COEFFICIENTS).float()
        weight = weight - lr * orthogonal.reshape(4, 3, 1, 1)
        weight = weight * (1 - lr * decay)  # decoupled, after the update
    torch.testing.assert_close(optimizer.state[param]["momentum_buffer"], buf)
    torch.testing.assert_close(param.detach(), weight)


def test_agrees_with_torch_muon_where_they_coincide():
    # torch's buffer is an EMA, buf ← m·buf + (1−m)·g, so it is (1−m)× ours, and its Nesterov update
    # g.lerp(buf, m) = (1−m)·(g + m·buf_ours) is too; NS divides by the Frobenius norm, which removes
    # that scale, so only bf16 rounding separates the two. They differ elsewhere: torch scales lr by
    # √max(1, rows/cols) (1 here, rows ≤ cols), decays the weight before the update rather than after
    # (weight_decay 0 here), never renormalises (off here), fuses NS into addmm (other bf16
    # rounding), and takes only 2-D weights.
    lr, momentum = 0.02, 0.9
    start = randn(16, 32, seed=8)
    grads = [[randn(16, 32, seed=100 + i)] for i in range(5)]
    ours, theirs = leaf(start), leaf(start)
    run(Muon([ours], lr=lr, momentum=momentum, normalize_weights=False), [ours], grads)
    run(torch.optim.Muon([theirs], lr=lr, momentum=momentum, weight_decay=0.0, nesterov=True,
                         ns_coefficients=NS_COEFFICIENTS, eps=1e-7, ns_steps=3), [theirs], grads)
    # One NS output moves about 2% when only its bf16 rounding changes (measured: input scaled, or
    # addmm); a wrong convention (no Nesterov, momentum 0.8, 4 NS steps) moves this 10–25%.
    assert relative_error(ours.detach() - start, theirs.detach() - start) < 3e-2


# --- SGD groups ---------------------------------------------------------------------------------

def test_sgd_groups_are_bitwise_torch_sgd():
    shapes = [(8, 4), (8,), (5,)]
    starts = [randn(*s, seed=10 + i) for i, s in enumerate(shapes)]
    grads = [[randn(*s, seed=20 + 3 * step + i) for i, s in enumerate(shapes)] for step in range(4)]
    sgd_groups = [dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
                  dict(lr=0.05, momentum=0.85, nesterov=False, weight_decay=0.0)]

    ours = [leaf(s) for s in starts]
    filter_ = leaf(randn(4, 3, 1, 1, seed=30))  # a Muon group alongside must not disturb them
    optimizer = Muon([{"params": ours[:2], "muon": False, **sgd_groups[0]},
                      {"params": ours[2:], "muon": False, **sgd_groups[1]},
                      {"params": [filter_]}], lr=0.3)
    for step_grads in grads:
        filter_.grad = torch.ones_like(filter_)
        run(optimizer, ours, [step_grads])

    theirs = [leaf(s) for s in starts]
    reference = torch.optim.SGD([{"params": theirs[:2], **sgd_groups[0]},
                                 {"params": theirs[2:], **sgd_groups[1]}])
    run(reference, theirs, grads)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert torch.equal(optimizer.state[a]["momentum_buffer"], reference.state[b]["momentum_buffer"])


# --- batching and the renormalisation schedule --------------------------------------------------

def test_batched_equals_tensor_by_tensor():
    # Repeated and unique shapes, a 2-D weight, a tall matrix (transposed in NS): batching must
    # hand each tensor back its own update.
    shapes = [(8, 4, 3, 3), (16, 8, 3, 3), (8, 4, 3, 3), (6, 10), (12, 2, 1, 1), (12, 2, 1, 1)]
    starts = [randn(*s, seed=40 + i) for i, s in enumerate(shapes)]
    grads = [[randn(*s, seed=50 + 6 * step + i) for i, s in enumerate(shapes)] for step in range(3)]
    results = {}
    for batched in (True, False):
        params = [leaf(s) for s in starts]
        run(Muon(params, lr=0.1, batched=batched), params, grads)
        results[batched] = params
    for a, b, start in zip(results[True], results[False], starts):
        assert relative_error(a.detach() - start, b.detach() - start) < 1e-2


def records_renormalisation_steps(total_steps: int) -> list[int]:
    # hiverge cifar10-speedrun: norm_freq = 2 + int(15 * progress); renormalise when
    # step_count - last_norm_step >= norm_freq.
    last, steps = 0, []
    for step_count in range(1, total_steps + 1):
        if step_count - last >= 2 + int(15 * step_count / total_steps):
            last = step_count
            steps.append(step_count)
    return steps


@pytest.mark.parametrize("every, every_end, total_steps, expected", [
    (1, None, None, list(range(1, 101))),  # airbench94_muon: every step
    (2, 17, 100, records_renormalisation_steps(100)),
])
def test_renormalisation_schedule(every, every_end, total_steps, expected):
    # lr 0 leaves only the renormalisation to change the weight: before each step it is set to
    # norm 3, after it the norm is 2 = √(4 out channels) exactly when a renormalisation ran.
    direction = randn(4, 3, 1, 1, seed=60)
    param = leaf(direction)
    optimizer = Muon([param], lr=0.0, normalize_every=every, normalize_every_end=every_end,
                     total_steps=total_steps)
    renormalised = []
    for step in range(1, 101):
        with torch.no_grad():
            param.copy_(direction * (3.0 / direction.norm()))
        param.grad = randn(4, 3, 1, 1, seed=1000 + step)
        optimizer.step()
        if abs(param.norm().item() - 2.0) < 1e-4:
            renormalised.append(step)
    assert renormalised == expected


# --- resume -------------------------------------------------------------------------------------

def make_optimizer(filters, biases) -> Muon:
    return Muon([{"params": filters, "normalize_every": 2, "normalize_every_end": 5, "total_steps": 10,
                  "weight_decay": 0.01},
                 {"params": biases, "muon": False, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}],
                lr=0.1)


def test_state_dict_resume_is_bitwise():
    shapes = [(8, 4, 3, 3), (8, 4, 3, 3), (8,)]
    starts = [randn(*s, seed=70 + i) for i, s in enumerate(shapes)]
    grads = [[randn(*s, seed=80 + 3 * step + i) for i, s in enumerate(shapes)] for step in range(8)]

    straight = [leaf(s) for s in starts]
    run(make_optimizer(straight[:2], straight[2:]), straight, grads)

    first = [leaf(s) for s in starts]
    optimizer = make_optimizer(first[:2], first[2:])
    run(optimizer, first, grads[:3])
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    resumed = [leaf(p.detach()) for p in first]
    optimizer = make_optimizer(resumed[:2], resumed[2:])
    optimizer.load_state_dict(torch.load(saved))
    assert optimizer.param_groups[0]["step"] == 3
    run(optimizer, resumed, grads[3:])
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


# --- argument checks ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (dict(lr=-0.1), "lr"),
    (dict(momentum=-0.1), "momentum"),
    (dict(momentum=1.0), "momentum"),
    (dict(weight_decay=-0.01), "weight_decay"),
    (dict(ns_steps=0), "ns_steps"),
    (dict(ns_coefficients=(3.4445, -4.7750)), "ns_coefficients"),
    (dict(normalize_every=0), "normalize_every"),
    (dict(normalize_every=3, normalize_every_end=2), "normalize_every_end"),
    (dict(normalize_every=2, normalize_every_end=17), "total_steps"),
    (dict(normalize_every=2, normalize_every_end=17, total_steps=0), "total_steps"),
])
def test_out_of_range_arguments(overrides, key):
    with pytest.raises(ValueError, match=key):
        Muon([leaf(torch.ones(4, 3, 1, 1))], **{"lr": 0.1, **overrides})


def test_out_of_range_group_value_and_shape():
    with pytest.raises(ValueError, match="momentum"):
        Muon([{"params": [leaf(torch.ones(4, 3))], "momentum": 1.5}], lr=0.1)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        Muon([leaf(torch.ones(4))], lr=0.1)
    Muon([{"params": [leaf(torch.ones(4))], "muon": False}], lr=0.1)  # a bias belongs in an SGD group
