"""Muon (Newton-Schulz, momentum, weight decay, the rank split), the optimizer wiring and the LR schedule."""

import pytest
import torch
from conftest import run_distributed, tiny_h

import train_gpt
from train_gpt import Dist, Muon, lr_scale, zeropower_via_newtonschulz5

CPU = Dist(0, 1, 0, torch.device("cpu"))


@pytest.mark.parametrize("shape", [(64, 192), (192, 64), (256, 1024), (64, 64), (256, 256)])
def test_newton_schulz_is_close_to_orthogonal(shape):
    torch.manual_seed(0)
    G = torch.randn(shape) * 3.0
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(G, 5))
    assert s.max() < 1.25
    if shape[0] != shape[1]:
        assert s.min() > 0.6  # every direction lands in the quintic's band around 1
    else:  # a square Gaussian matrix has near-zero singular values that 5 steps cannot lift all the way
        assert (s > 0.6).float().mean() > 0.95
    assert zeropower_via_newtonschulz5(G, 5).shape == G.shape


def _muon_reference(p0, grads, lr, momenta, wd):
    """The spec's rule written out: buf <- m*buf + g; u = g + m*buf; p <- p*(1-lr*wd) - lr*scale*NS(u)."""
    p, buf = p0.clone(), torch.zeros_like(p0)
    for g, m in zip(grads, momenta):
        buf = m * buf + g
        u = zeropower_via_newtonschulz5(g + m * buf, 5) * max(1, p.size(0) / p.size(1)) ** 0.5
        p = p * (1 - lr * wd) - lr * u
    return p


def _run_muon(params, grads_per_step, momenta, d: Dist, lr=0.02, wd=0.1):
    opt = Muon(params, lr=lr, momentum=0.0, backend_steps=5, weight_decay=wd, d=d)
    for grads, m in zip(grads_per_step, momenta):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        for group in opt.param_groups:
            group["momentum"] = m
        opt.step()
    return [p.detach().clone() for p in params], len(opt.state)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(32, 16), (16, 48), (24, 24)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    return params, grads, [0.85, 0.9, 0.95]  # momentum changing as in the warm-up


def test_muon_follows_the_spec_rule_under_momentum_warmup():
    params, grads, momenta = _problem()
    got, _ = _run_muon([p.clone() for p in params], grads, momenta, CPU)
    for i, p0 in enumerate(params):
        ref = _muon_reference(p0, [g[i] for g in grads], 0.02, momenta, 0.1)
        torch.testing.assert_close(got[i], ref, rtol=1e-5, atol=1e-6)


def _muon_rank(rank, world_size):
    params, grads, momenta = _problem()
    return _run_muon([p.clone() for p in params], grads, momenta, Dist(rank, world_size, 0, torch.device("cpu")))


def test_muon_split_across_two_ranks_equals_one_rank():
    params, grads, momenta = _problem()
    single, _ = _run_muon([p.clone() for p in params], grads, momenta, CPU)
    results = run_distributed(_muon_rank, 2)
    for rank_params, _ in results:
        for a, b in zip(rank_params, single):
            assert torch.equal(a, b)  # each matrix is computed on one rank; the others add exact zeros
    assert [n for _, n in results] == [2, 1]  # momentum buffers live only on the owning rank (i % 2)


def test_optimizers_set_lr_and_momentum_per_step():
    h = tiny_h(matrix_lr=0.04, scalar_lr=0.03, tied_embed_lr=0.05)
    opt = train_gpt.Optimizers(h, train_gpt.GPT(h), CPU)
    opt.step(0.5, 0.9)
    assert sorted(g["lr"] for g in opt.adam.param_groups) == [0.015, 0.025]
    assert [(g["lr"], g["momentum"]) for g in opt.muon.param_groups] == [(0.02, 0.9)]


def test_momentum_warmup():
    h = tiny_h(muon_momentum=0.95, muon_momentum_warmup_start=0.85, muon_momentum_warmup_steps=500)
    assert [round(train_gpt.muon_momentum(h, s), 6) for s in (0, 250, 500, 900)] == [0.85, 0.9, 0.95, 0.95]
    assert train_gpt.muon_momentum(tiny_h(muon_momentum_warmup_steps=0), 0) == tiny_h().muon_momentum


def test_wallclock_warmdown_reaches_zero_at_the_cap():
    h = tiny_h(iterations=20000, warmdown_iters=100, max_wallclock_seconds=10.0, quant_method="rtn")  # 10 s cap
    step_ms = 20.0  # 500 steps fit; the warmdown covers the last 100 steps = 2000 ms
    assert lr_scale(h, 100, 100 * step_ms) == 1.0
    assert lr_scale(h, 400, 400 * step_ms) == pytest.approx(1.0)
    assert lr_scale(h, 450, 450 * step_ms) == pytest.approx(0.5)
    assert lr_scale(h, 499, 499 * step_ms) == pytest.approx(0.01)
    assert lr_scale(h, 510, 510 * step_ms) == 0.0


def test_step_warmdown_without_cap_and_whichever_ends_first():
    h = tiny_h(iterations=1000, warmdown_iters=200, max_wallclock_seconds=0.0)
    assert [lr_scale(h, s, 0.0) for s in (0, 800, 900, 999)] == [1.0, 1.0, 0.5, 0.005]
    capped = tiny_h(iterations=1000, warmdown_iters=200, max_wallclock_seconds=3600.0)
    assert lr_scale(capped, 900, 900.0) == 0.5  # iterations run out long before the cap
    assert lr_scale(tiny_h(warmdown_iters=0), 5, 1e9) == 1.0
