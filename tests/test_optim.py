"""Parallel Muon (Newton-Schulz, momentum, weight decay, banks, the rank split), global-norm clipping, the optimizer
wiring and the LR schedule."""

import dataclasses

import pytest
import torch
import torch.nn as nn
from conftest import SEED_STACK_ENV, run_distributed, tiny_h
from helpers import randomized, tiny_default_h

import train_gpt
from train_gpt import NS_COEFFICIENTS, Dist, Hyperparameters, lr_scale, zeropower_via_newtonschulz5

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


def _run_muon(d: Dist, lr=0.02, wd=0.1, ns_fn=zeropower_via_newtonschulz5, **knobs):
    """Three Parallel Muon steps; rank r sees grads g + (-1)^r * noise, whose average over 2 ranks is g."""
    model, (grads, momenta) = _Blocks(), _problem()
    h = tiny_h(matrix_lr=lr, muon_wd=wd, **knobs)
    opt = train_gpt.ParallelMuon(h, train_gpt.bank_block_matrices(model, d), d, ns_fn)
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


def _muon_rank(rank, world_size, knobs):
    got, shards, _ = _run_muon(Dist(rank, world_size, 0, torch.device("cpu")), **knobs)
    return got, shards


FRONTIER_MUON = dict(muon_row_norm=True, muon_ns_coeffs="polar_express")  # MuonEq-R (PR #1285), PR #1787


@pytest.mark.parametrize("knobs", [{}, FRONTIER_MUON], ids=["default", "frontier"])
def test_parallel_muon_on_two_ranks_equals_one_rank_for_uneven_banks(knobs):
    single, _, _ = _run_muon(CPU, **knobs)
    results = run_distributed(_muon_rank, 2, knobs)
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
    assert lr_scale(tiny_h(warmdown_iters=0, warmdown_frac=0.0), 5, 1e9) == 1.0  # neither schedule


# ---- the frontier optimizer and schedule: every knob off by default, exactly today's training when off ----

NEW_KNOBS_OFF = dict(muon_row_norm=False, muon_ns_coeffs="quintic", muon_wd_taper_start=0.0, warmdown_frac=0.0,
                     min_lr=0.0)


def test_the_seed_stack_keeps_the_new_optimizer_knobs_off():
    defaults = Hyperparameters.from_env(SEED_STACK_ENV)
    assert {k: defaults.used(k) or 0.0 if k == "warmdown_frac" else getattr(defaults, k) for k in NEW_KNOBS_OFF} \
        == NEW_KNOBS_OFF  # the fraction's schedule is dormant: WARMDOWN_ITERS selects the baseline's
    assert defaults.embed_wd == defaults.adam_wd == 0.04  # the embedding tables decay as before


def _quintic_before(G, steps, eps=1e-7):
    """zeropower_via_newtonschulz5 as it was before the coefficient table, verbatim."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm(dim=(-2, -1), keepdim=True) + eps)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if transposed else X


@pytest.mark.parametrize("steps", [1, 5, 7])
def test_quintic_newton_schulz_is_bit_identical_to_before(steps):
    G = torch.randn(3, 48, 32, generator=torch.Generator().manual_seed(steps))
    assert torch.equal(zeropower_via_newtonschulz5(G, steps), _quintic_before(G, steps))
    assert torch.equal(zeropower_via_newtonschulz5(G.bfloat16(), steps), _quintic_before(G.bfloat16(), steps))


def _ill_conditioned(rows, cols, gen):
    """Singular values spread log-uniformly over four decades."""
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen))
    return U @ torch.diag(torch.logspace(0, -4, k)) @ V.T


@pytest.mark.parametrize("shape", [(64, 192), (192, 64), (256, 1024), (128, 128), "ill-tall", "ill-wide"])
def test_polar_express_maps_singular_values_into_a_tight_band(shape):
    """PR #1787's coefficients, 5 steps in fp32: every singular value at least 1e-3 of ||G||_F (the range they
    are designed for) lands in [0.85, 1.15] (measured: [0.859, 1.141]; the quintic's is about [0.68, 1.2] and
    needs 1e-1 of ||G||_F), and none exceeds 1.15. Input and output singular values are paired through G's
    singular vectors, which the odd matrix polynomial keeps."""
    gen = torch.Generator().manual_seed(0)
    if isinstance(shape, str):
        G = _ill_conditioned(*((512, 128) if shape == "ill-tall" else (96, 384)), gen)
    else:
        G = torch.randn(shape, generator=gen) * 3.0
    Y = zeropower_via_newtonschulz5(G, 5, coeffs=NS_COEFFICIENTS["polar_express"])
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    out = torch.diagonal(U.T @ Y.double() @ Vh.T)
    big = S / S.square().sum().sqrt() >= 1e-3
    assert big.sum() >= min(G.shape) // 2  # the band covers most directions of every case
    assert 0.85 < out[big].min() and out[big].max() < 1.15, (out[big].min().item(), out[big].max().item())
    assert torch.linalg.svdvals(Y).max() < 1.15


def test_polar_express_runs_its_table_and_never_past_its_end():
    G = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    table = NS_COEFFICIENTS["polar_express"]
    assert torch.equal(zeropower_via_newtonschulz5(G, 9, coeffs=table), zeropower_via_newtonschulz5(G, 5, coeffs=table))
    assert torch.equal(zeropower_via_newtonschulz5(G, 2, coeffs=table),
                       zeropower_via_newtonschulz5(G, 2, coeffs=table[:2]))
    assert not torch.equal(zeropower_via_newtonschulz5(G, 5, coeffs=table), zeropower_via_newtonschulz5(G, 5))


def test_newton_schulz_with_either_table_traces_as_one_graph():
    """train compiles it (fullgraph, dynamic=False): the table is constant data, no graph break."""
    torch._dynamo.reset()
    G = torch.randn(2, 24, 40, generator=torch.Generator().manual_seed(2))
    for name, table in NS_COEFFICIENTS.items():
        ns = torch.compile(zeropower_via_newtonschulz5, backend="eager", fullgraph=True, dynamic=False)
        torch.testing.assert_close(ns(G, 5, coeffs=table), zeropower_via_newtonschulz5(G, 5, coeffs=table))


def test_muon_row_norm_hands_unit_rows_to_newton_schulz_and_changes_the_result():
    seen = []

    def recording_ns(x, steps, **kw):
        seen.append(x.clone())
        return zeropower_via_newtonschulz5(x, steps, **kw)

    on, _, _ = _run_muon(CPU, ns_fn=recording_ns, muon_row_norm=True)
    assert len(seen) == 9  # 3 banks x 3 steps
    for x in seen:
        torch.testing.assert_close(x.norm(dim=-1), torch.ones(x.shape[:-1]), rtol=1e-5, atol=1e-6)
    seen.clear()
    off, _, _ = _run_muon(CPU, ns_fn=recording_ns)
    assert not all(torch.allclose(x.norm(dim=-1), torch.ones(x.shape[:-1])) for x in seen)
    assert not any(torch.allclose(a, b) for a, b in zip(on, off))


def test_muon_ns_coeffs_changes_the_optimizer_result():
    quintic, _, _ = _run_muon(CPU)
    polar, _, _ = _run_muon(CPU, muon_ns_coeffs="polar_express")
    assert not any(torch.allclose(a, b) for a, b in zip(quintic, polar))


def _optimizer_steps(h, steps=3, wd_scale=1.0):
    """A few Optimizers steps of a tiny GPT on fixed batches; every parameter by name afterwards."""
    torch.manual_seed(0)
    model = train_gpt.GPT(h)
    opt = train_gpt.Optimizers(h, model, train_gpt.bank_block_matrices(model, CPU), CPU)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randint(0, 1024, (4, 32), generator=g)
        model(x, x.roll(-1, 1)).backward()
        opt.step(lr_scale(h, step, 0.0), train_gpt.muon_momentum(h, step), wd_scale)
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt


def _hand_newton_schulz(G, steps, a=3.4445, b=-4.7750, c=2.0315):
    """Keller Jordan's quintic iteration written out: X = G / |G|_F (the wide way round), `steps` times
    X <- a X + (b A + c A^2) X with A = X X^T."""
    X = G / (G.norm() + 1e-7)
    wide = X.size(0) <= X.size(1)
    X = X if wide else X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.T


def _hand_two_steps(h, p0, g, kind, lrs, wds, momentum):
    """Two optimizer steps of one parameter by the update rules: Muon (Nesterov, no row norm, quintic
    Newton-Schulz of MUON_BACKEND_STEPS steps, decoupled WD) for the block matrices, AdamW with bias correction
    (BETA1, BETA2, ADAM_EPS, decoupled WD) for the rest."""
    p = p0.clone()
    if kind == "matrix":
        buf, scale = torch.zeros_like(p), max(1.0, p.size(0) / p.size(1)) ** 0.5
        for gt in g:
            buf = momentum * buf + gt
            p = p * (1 - h.matrix_lr * h.muon_wd) - h.matrix_lr * scale * _hand_newton_schulz(gt + momentum * buf,
                                                                                           h.muon_backend_steps)
        return p
    m, v, lr, wd = torch.zeros_like(p), torch.zeros_like(p), lrs[kind], wds[kind]
    for t, gt in enumerate(g, 1):
        m, v = h.beta1 * m + (1 - h.beta1) * gt, h.beta2 * v + (1 - h.beta2) * gt * gt
        p = p * (1 - lr * wd) - lr * (m / (1 - h.beta1**t)) / ((v / (1 - h.beta2**t)).sqrt() + h.adam_eps)
    return p


OPTIMIZER_CASES = {  # on the default preset with the frontier optimizer knobs off (and clipping off)
    "frontier_knobs_off": {},
    "untied_embed_and_head_lr": dict(tie_embeddings=False, embed_lr=0.3, head_lr=0.05),
    "beta1_and_adam_eps": dict(beta1=0.5, adam_eps=1e-2),
    "muon_backend_steps": dict(muon_backend_steps=2),
}


def _break(opt, case):
    """The control of each case: the knob's value lost on the way into the optimizer."""
    if case == "frontier_knobs_off":
        opt.muon.row_norm = True
    elif case == "untied_embed_and_head_lr":
        opt.adam.param_groups[0]["base_lr"] = 0.03  # TIED_EMBED_LR's default for the untied embedding
    elif case == "beta1_and_adam_eps":
        for g in opt.adam.param_groups:
            g["betas"], g["eps"] = (0.9, g["betas"][1]), 1e-8
    else:
        opt.muon.steps = 5


@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_two_optimizer_steps_of_the_default_preset_follow_the_update_rules(case):
    """Every parameter of the tiny default model after two Optimizers steps on fixed gradients equals the update
    rules written out (_hand_two_steps), with EMBED_LR / HEAD_LR the untied groups' LRs, BETA1 and ADAM_EPS in
    AdamW's moments and denominator, MUON_BACKEND_STEPS the Newton-Schulz iterations, and the frontier optimizer
    knobs (MuonEq-R, Polar Express, the WD taper, WARMDOWN_FRAC, MIN_LR) off by their own switches. Control:
    each case's knob lost on the way in (_break) fails the same comparison."""
    h = tiny_default_h(**NEW_KNOBS_OFF, grad_clip_norm=0.0, **OPTIMIZER_CASES[case])
    kinds = {"embed": h.tied_embed_lr if h.tie_embeddings else h.embed_lr, "head": h.head_lr,
             "softcap": h.scalar_lr, "scalar": h.scalar_lr}
    wds = {"embed": h.embed_wd, "head": h.adam_wd, "softcap": 0.0, "scalar": h.adam_wd}

    def run(broken):
        model = randomized(train_gpt.GPT(h))
        p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = train_gpt.Optimizers(h, model, train_gpt.bank_block_matrices(model, CPU), CPU)
        assert {g["lr"] for g in opt.adam.param_groups} >= {kinds["embed"]} | ({h.head_lr} if not h.tie_embeddings else set())
        assert all(g["betas"] == (h.beta1, h.beta2) and g["eps"] == h.adam_eps for g in opt.adam.param_groups)
        if broken:
            _break(opt, case)
        gen, grads = torch.Generator().manual_seed(5), {n: [] for n in p0}
        for _ in range(2):
            for n, p in model.named_parameters():
                grads[n].append(torch.randn(p.shape, generator=gen) * 0.1)
                if p.grad is None:
                    p.grad = grads[n][-1].clone()
                else:
                    p.grad.copy_(grads[n][-1])  # a bank's view: write into it
            opt.step(1.0, 0.9)
        return model, p0, grads

    model, p0, grads = run(False)
    kind = {n: k for k, members in train_gpt.param_groups(model).items() for n, _ in members}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), _hand_two_steps(h, p0[n], grads[n], kind[n], kinds, wds, 0.9),
                                   rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    model, p0, grads = run(True)
    with pytest.raises(AssertionError):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), _hand_two_steps(h, p0[n], grads[n], kind[n], kinds, wds, 0.9),
                                       rtol=1e-4, atol=1e-6)


def test_muon_backend_steps_is_the_newton_schulz_iteration_count():
    """MUON_BACKEND_STEPS reaches ParallelMuon as the steps of every Newton-Schulz call; the function runs that many
    iterations of the quintic (the hand loop), and the Polar Express table its first min(steps, 5) triples."""
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    for steps in (1, 3, 5):
        torch.testing.assert_close(zeropower_via_newtonschulz5(G, steps), _hand_newton_schulz(G, steps))
    assert not torch.allclose(zeropower_via_newtonschulz5(G, 2), zeropower_via_newtonschulz5(G, 3))
    polar = NS_COEFFICIENTS["polar_express"]
    torch.testing.assert_close(zeropower_via_newtonschulz5(G, 7, coeffs=polar), zeropower_via_newtonschulz5(G, 5, coeffs=polar))
    seen = []
    _run_muon(CPU, ns_fn=lambda x, steps, **kw: seen.append(steps) or zeropower_via_newtonschulz5(x, steps, **kw),
              muon_backend_steps=3)
    assert seen == [3] * 9  # 3 banks x 3 steps


def test_embed_wd_decays_the_embedding_tables_only():
    """One step (later steps see the changed embeddings through the model): EMBED_WD moves the embedding tables
    (token, bigram, value) and nothing else; ADAM_WD keeps the scalar group."""
    base, opt = _optimizer_steps(tiny_h(tied_embed_lr=0.5), steps=1)
    assert [g["weight_decay"] for g in opt.adam.param_groups] == [0.04, 0.04]  # embed, scalar (the head is tied)
    heavy, opt = _optimizer_steps(tiny_h(tied_embed_lr=0.5, embed_wd=0.5), steps=1)
    assert [g["weight_decay"] for g in opt.adam.param_groups] == [0.5, 0.04]
    embeds = {n for n, _ in train_gpt.param_groups(train_gpt.GPT(tiny_h()))["embed"]}
    assert embeds == {"tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight"}
    assert all(torch.equal(base[n], heavy[n]) for n in base if n not in embeds)
    assert not torch.equal(base["tok_emb.weight"], heavy["tok_emb.weight"])
    assert not torch.equal(base["ve_shared.embed.weight"], heavy["ve_shared.embed.weight"])
    base, _ = _optimizer_steps(tiny_h(tied_embed_lr=0.5), steps=2)  # the bigram table starts at zero
    heavy, _ = _optimizer_steps(tiny_h(tied_embed_lr=0.5, embed_wd=0.5), steps=2)
    assert not torch.equal(base["bigram.embed.weight"], heavy["bigram.embed.weight"])


def test_muon_wd_scale_tapers_muon_weight_decay():
    h = tiny_h(muon_wd=0.2, muon_wd_taper_start=0.7, muon_wd_taper_factor=0.5, iterations=1000)
    assert [train_gpt.muon_wd_scale(h, s, 0.0) for s in (0, 500, 700)] == [1.0, 1.0, 1.0]
    assert train_gpt.muon_wd_scale(h, 850, 0.0) == pytest.approx(0.75)
    assert train_gpt.muon_wd_scale(h, 1000, 0.0) == pytest.approx(0.5)
    capped = dataclasses.replace(h, max_wallclock_seconds=100.0, quant_method="rtn")  # by wall clock: 100 s cap
    assert train_gpt.muon_wd_scale(capped, 10, 85_000.0) == pytest.approx(0.75)
    assert train_gpt.muon_wd_scale(tiny_h(), 6, 1e9) == 1.0  # off
    full, _ = _optimizer_steps(h)
    tapered, opt = _optimizer_steps(h, wd_scale=0.5)
    assert opt.muon.wd == pytest.approx(0.1)
    assert any(not torch.equal(full[n], tapered[n]) for n in full if n.startswith("blocks."))


FRACS = [0.0, 0.1, 0.5, 0.69, 0.7, 0.71, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0]


@pytest.mark.parametrize("min_lr", [0.0, 0.1])
def test_warmdown_frac_schedule_by_steps_and_by_wall_clock(min_lr):
    """PR #1394 -> #1787: lr_mul(f) = 1 for f < 1 - W, else max((1 - f) / W, MIN_LR)."""
    def expected(f):
        return 1.0 if f < 0.7 else max((1 - f) / 0.3, min_lr)

    steps = tiny_h(warmdown_iters=0, warmdown_frac=0.3, min_lr=min_lr, iterations=1000, max_wallclock_seconds=0.0)
    capped = dataclasses.replace(steps, max_wallclock_seconds=200.0, quant_method="rtn")  # 200 s cap
    for f in FRACS:
        assert lr_scale(steps, round(1000 * f), 123.0) == pytest.approx(expected(round(1000 * f) / 1000))
        assert lr_scale(capped, 7, 200_000.0 * f) == pytest.approx(expected(f))  # the step count plays no part
    assert lr_scale(capped, 7, 400_000.0) == min_lr  # past the cap


def test_min_lr_floors_the_warmdown_iters_schedule():
    h = tiny_h(iterations=1000, warmdown_iters=200, max_wallclock_seconds=0.0, min_lr=0.2)
    assert [lr_scale(h, s, 0.0) for s in (0, 800, 900, 999, 1000)] == [1.0, 1.0, 0.5, 0.2, 0.2]
    h = tiny_h(warmdown_iters=0, warmdown_frac=0.0, min_lr=0.2)
    assert lr_scale(h, 5, 1e9) == 1.0


def test_min_lr_and_warmdown_frac_change_the_optimizer_result():
    h = tiny_h(iterations=4, warmdown_iters=3)
    base, _ = _optimizer_steps(h)
    for knobs in (dict(min_lr=0.9), dict(warmdown_iters=0, warmdown_frac=0.9)):
        other, _ = _optimizer_steps(dataclasses.replace(h, **knobs))
        assert not all(torch.equal(base[n], other[n]) for n in base), knobs


def test_one_lr_schedule_at_a_time():
    with pytest.raises(train_gpt.ConfigError, match=r"WARMDOWN_FRAC=0.3: has no effect unless WARMDOWN_ITERS=0"):
        Hyperparameters(warmdown_frac=0.3, warmdown_iters=4000)  # WARMDOWN_ITERS alone selects its schedule
    assert Hyperparameters(warmdown_frac=0.3, warmdown_iters=0).warmdown_frac == 0.3
    with pytest.raises(train_gpt.ConfigError, match="MIN_LR=1.5: must be in"):
        Hyperparameters(min_lr=1.5)
    with pytest.raises(train_gpt.ConfigError, match="MUON_NS_COEFFS='cubic': must be one of quintic, polar_express"):
        Hyperparameters.from_env({"MUON_NS_COEFFS": "cubic"})
