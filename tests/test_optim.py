"""Parallel Muon (Newton-Schulz, momentum, weight decay, banks, the rank split), global-norm clipping, the optimizer
wiring and the LR schedule."""

import pytest
import torch
import torch.nn as nn
from conftest import run_distributed, tiny_h

import train_gpt
from train_gpt import Dist, lr_scale, zeropower_via_newtonschulz5

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
    """The update rule written out: buf <- m*buf + g; u = g + m*buf; p <- p*(1-lr*wd) - lr*scale*NS(u)."""
    p, buf = p0.clone(), torch.zeros_like(p0)
    for g, m in zip(grads, momenta):
        buf = m * buf + g
        u = zeropower_via_newtonschulz5(g + m * buf, 5) * max(1, p.size(0) / p.size(1)) ** 0.5
        p = p * (1 - lr * wd) - lr * u
    return p


SHAPES = [(32, 16), (16, 48), (32, 16), (24, 24), (32, 16), (24, 24)]  # banks of 3, 1 and 2: uneven over 2 ranks


class _Blocks(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleList(nn.Linear(c, r, bias=False) for r, c in SHAPES)
        for m in self.blocks:
            m.weight.data = torch.randn(m.weight.shape, generator=g)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(3)]
    return grads, [0.85, 0.9, 0.95]  # momentum changing as in the warm-up


def _run_muon(d: Dist, lr=0.02, wd=0.1):
    """Three Parallel Muon steps; rank r sees grads g + (-1)^r * noise, whose average over 2 ranks is g."""
    model, (grads, momenta) = _Blocks(), _problem()
    opt = train_gpt.ParallelMuon(tiny_h(matrix_lr=lr, muon_wd=wd), train_gpt.bank_block_matrices(model, d), d)
    noise = torch.Generator().manual_seed(7)
    for step_grads, m in zip(grads, momenta):
        for layer, g in zip(model.blocks, step_grads):
            jitter = torch.randn(g.shape, generator=noise) if d.world_size > 1 else 0
            layer.weight.grad.copy_(g + (-1) ** d.rank * jitter)
        opt.momentum = m
        opt.reduce_scatter()
        opt.wait()
        opt.step()
        opt.zero_grad()
    return [m.weight.detach().clone() for m in model.blocks], [tuple(b.momentum.shape) for b in opt.banks], opt


def test_parallel_muon_follows_the_reference_rule_under_momentum_warmup():
    got, shards, opt = _run_muon(CPU)
    grads, momenta = _problem()
    for i, p0 in enumerate(_Blocks().blocks):
        ref = _muon_reference(p0.weight.detach(), [g[i] for g in grads], 0.02, momenta, 0.1)
        torch.testing.assert_close(got[i], ref, rtol=1e-5, atol=1e-6)
    assert shards == [(3, 32, 16), (2, 24, 24), (1, 16, 48)]  # banks by shape, the biggest first


def test_bank_storage_is_shared_with_the_layers():
    model = _Blocks()
    opt = train_gpt.ParallelMuon(tiny_h(), train_gpt.bank_block_matrices(model, CPU), CPU)
    bank = opt.banks[0]
    layers = [m for m in model.blocks if tuple(m.weight.shape) == (32, 16)]
    for i, m in enumerate(layers):
        assert m.weight.data_ptr() == bank.data[i].data_ptr() and m.weight.grad.data_ptr() == bank.grad[i].data_ptr()
    x = torch.randn(5, 16)
    layers[1](x).sum().backward()  # backward accumulates straight into the bank's gradient
    torch.testing.assert_close(bank.grad[1], torch.ones(32, 5) @ x)
    assert bank.grad[0].abs().sum() == 0 and bank.grad[2].abs().sum() == 0


def _muon_rank(rank, world_size):
    got, shards, _ = _run_muon(Dist(rank, world_size, 0, torch.device("cpu")))
    return got, shards


def test_parallel_muon_on_two_ranks_equals_one_rank_for_uneven_banks():
    single, _, _ = _run_muon(CPU)
    results = run_distributed(_muon_rank, 2)
    for rank_params, shards in results:
        for a, b in zip(rank_params, single):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # only the gradient averaging rounds differently
        assert shards == [(2, 32, 16), (1, 24, 24), (1, 16, 48)]  # each rank keeps momentum for its share only
    assert all(torch.equal(a, b) for a, b in zip(*(r[0] for r in results)))  # ranks hold identical weights


def _clip_rank(rank, world_size, clip):
    torch.manual_seed(0)
    h = tiny_h(grad_clip_norm=clip)
    model = train_gpt.GPT(h)
    opt = train_gpt.Optimizers(h, model, train_gpt.bank_block_matrices(model, d := Dist(rank, world_size, 0, torch.device("cpu"))), d)
    x = torch.randint(0, 1024, (4, 64), generator=torch.Generator().manual_seed(rank))
    model(x, x.roll(-1, 1)).backward()
    opt.step(1.0, 0.95)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.slow  # over 5 s on 2 CPU cores (two gloo ranks)
def test_gradient_clipping_uses_the_global_norm_on_any_world_size():
    """2 ranks with different batches clip the averaged gradient exactly as 1 rank with a summed batch would."""
    torch.manual_seed(0)
    h = tiny_h(grad_clip_norm=0.3)
    model = train_gpt.GPT(h)
    opt = train_gpt.Optimizers(h, model, train_gpt.bank_block_matrices(model, CPU), CPU)
    for rank in range(2):
        x = torch.randint(0, 1024, (4, 64), generator=torch.Generator().manual_seed(rank))
        (model(x, x.roll(-1, 1)) / 2).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    total = torch.sqrt(sum(g.square().sum() for g in grads))
    assert total > 0.3  # clipping acts
    opt.step(1.0, 0.95)
    one = torch.cat([p.detach().flatten() for p in model.parameters()])
    for two in run_distributed(_clip_rank, 2, 0.3):
        torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-6)


def test_optimizers_set_lr_and_momentum_per_step():
    h = tiny_h(matrix_lr=0.04, scalar_lr=0.03, tied_embed_lr=0.05)
    opt = train_gpt.Optimizers(h, model := train_gpt.GPT(h), train_gpt.bank_block_matrices(model, CPU), CPU)
    opt.step(0.5, 0.9)
    assert sorted(g["lr"] for g in opt.adam.param_groups) == [0.015, 0.025]
    assert (opt.muon.lr, opt.muon.momentum) == (0.02, 0.9)


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
