"""Properties that the differential harness against the records' own code (issue 28; kept out of the repository)
found to hold, checked here on hand-made examples without that code: one full Muon update with MuonEq-R and Polar
Express, one AdamW step of the embedding and scalar groups at a scheduled LR, and the schedule's multipliers at
given steps."""

import math

import torch
import torch.nn as nn
from conftest import tiny_h

import train_gpt
from train_gpt import Dist

CPU = Dist(0, 1, 0, torch.device("cpu"))
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),  # Polar Express's 5-step table
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def _muon_eq_r_reference(p, grads, momenta, lr, wd):
    """The records' update written out: buf <- m*buf + g; u = g + m*buf; each row of u to unit L2 norm; X = u/|u|_F
    (transposed when tall); per Polar Express triple X <- aX + (bA + cA^2)X with A = XX^T; p <- p*(1 - lr*wd) -
    lr*sqrt(max(1, rows/cols))*X."""
    buf = torch.zeros_like(p)
    for g, m in zip(grads, momenta):
        buf = m * buf + g
        u = g + m * buf
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-7)
        x = u.T if u.size(0) > u.size(1) else u
        x = x / (x.norm() + 1e-7)
        for a, b, c in POLAR_EXPRESS:
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
        x = x.T if u.size(0) > u.size(1) else x
        p = p * (1 - lr * wd) - lr * max(1.0, p.size(0) / p.size(1)) ** 0.5 * x
    return p


def test_muon_with_row_norm_and_polar_express_is_the_records_update_rule():
    shapes = [(48, 24), (24, 48), (48, 24)]  # a tall bank of two (scale sqrt(2)) and a wide one
    gen = torch.Generator().manual_seed(3)
    model = nn.Module()
    model.blocks = nn.ModuleList(nn.Linear(c, r, bias=False) for r, c in shapes)
    start = [m.weight.detach().clone() for m in model.blocks]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    momenta = [0.92, 0.95, 0.97]  # the warm-up's values
    h = tiny_h(matrix_lr=0.026, muon_wd=0.095, muon_row_norm=True, muon_ns_coeffs="polar_express", muon_backend_steps=5)
    opt = train_gpt.ParallelMuon(h, train_gpt.bank_block_matrices(model, CPU), CPU)
    for step_grads, m in zip(grads, momenta):
        for layer, g in zip(model.blocks, step_grads):
            layer.weight.grad.copy_(g)
        opt.momentum = m
        opt.reduce_scatter()
        opt.wait()
        opt.step()
        opt.zero_grad()
    for i, layer in enumerate(model.blocks):
        ref = _muon_eq_r_reference(start[i], [g[i] for g in grads], momenta, 0.026, 0.095)
        torch.testing.assert_close(layer.weight.detach(), ref, rtol=1e-5, atol=1e-6)


def test_adam_groups_step_at_the_scheduled_lr_with_decoupled_decay():
    """One step at LR multiplier 0.5: the embedding moves by lr*sign-like Adam step plus lr*EMBED_WD decay, a scalar
    by its own LR and ADAM_WD, every lr = base_lr * scale (the records scale the decay with the step)."""
    h = tiny_h(tied_embed_lr=0.03, scalar_lr=0.02, embed_wd=0.085, adam_wd=0.02, grad_clip_norm=0.0,
               beta1=0.9, beta2=0.99, adam_eps=1e-8)
    model = train_gpt.GPT(h)
    opt = train_gpt.Optimizers(h, model, train_gpt.bank_block_matrices(model, CPU), CPU)
    emb, scalar = model.tok_emb.weight, model.blocks[0].attn_scale
    e0, s0 = emb.detach().clone(), scalar.detach().clone()
    ge, gs = torch.full_like(emb, 2e-3), torch.full_like(scalar, -5e-2)
    for p, g in ((emb, ge), (scalar, gs)):
        p.grad = g.clone()
    opt.step(0.5, 0.95)

    def adam_once(p0, g, lr, wd):  # bias-corrected first step: m_hat = g, v_hat = g^2
        return p0 * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)

    torch.testing.assert_close(emb.detach(), adam_once(e0, ge, 0.015, 0.085), rtol=0, atol=1e-7)
    torch.testing.assert_close(scalar.detach(), adam_once(s0, gs, 0.01, 0.02), rtol=0, atol=1e-7)


def test_schedule_multipliers_at_given_steps_are_the_records():
    """WARMDOWN_FRAC 0.85 floored at MIN_LR 0.1 over 1,000 steps; Muon momentum 0.92 -> 0.97 over 1,500 steps; the
    ramp of 32 steps after a length switch at step 100 (PR #2014's train_model at these steps)."""
    h = tiny_h(iterations=1000, max_wallclock_seconds=0.0, warmdown_frac=0.85, warmdown_iters=0, min_lr=0.1,
               muon_momentum=0.97, muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=1500,
               train_seq_schedule="32@0.100,64@1.000", train_seq_len=64, seq_change_warmup_steps=32)
    lr = {s: train_gpt.lr_scale(h, s, 0.0) for s in (0, 150, 151, 500, 900, 999)}
    assert lr[0] == lr[150] == 1.0
    assert math.isclose(lr[151], 0.849 / 0.85) and math.isclose(lr[500], 0.5 / 0.85)
    assert math.isclose(lr[900], 0.1 / 0.85) and lr[999] == 0.1  # the floor from (1 - f) / 0.85 < 0.1 on
    mom = [train_gpt.muon_momentum(h, s) for s in (0, 750, 1500, 3000)]
    assert [round(m, 6) for m in mom] == [0.92, 0.945, 0.97, 0.97]
    ramp = [train_gpt.seq_ramp(h, s, 100) for s in (100, 115, 131, 132, 500)]
    assert ramp == [1 / 32, 16 / 32, 1.0, 1.0, 1.0]
    assert train_gpt.seq_ramp(h, 5, 0) == 1.0  # no switch yet
