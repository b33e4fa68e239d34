"""The seed-stack techniques, each by the property that defines it (docs/presets.md, "The seed stack")."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BASELINE_ENV, SEED_STACK_ENV, tiny_h
from reference_baseline import GPT as BaselineGPT
from helpers import CPU, assert_matches_reference, default_ids, randomized, tiny_default_h

import train_gpt
from train_gpt import GPT, Hyperparameters

BOS = 1


def test_all_techniques_off_is_the_foundation_baseline():
    """The baseline settings give the foundation's model: same parameters, bit-identical logits."""
    h = Hyperparameters.from_env({**BASELINE_ENV, "NUM_LAYERS": "5", "MODEL_DIM": "64", "NUM_HEADS": "4",
                                  "NUM_KV_HEADS": "2"})
    torch.manual_seed(0)
    reference = randomized(BaselineGPT(h))
    model = GPT(h)
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randint(0, 1024, (2, 40))
    x[:, [0, 17]] = BOS
    assert torch.equal(model.forward_logits(x), reference.forward_logits(x))


def test_unet_skips_off_removes_them():
    model = GPT(tiny_h(unet_skips=False, num_layers=4, ve_layers="3"))
    assert model.skip_weights is None


def test_skip_gates_off_is_the_plain_skip_and_on_changes_it(monkeypatch):
    """On the default preset (gates on), SKIP_GATES=0 alone gives decoder entries x + w_j * skip: the reference
    forward without the gates and their parameters. Control: gates applied with the switch off are caught."""
    x = default_ids()
    h = tiny_default_h(skip_gates=False)
    off = randomized(GPT(h))
    assert off.skip_gates is None
    assert_matches_reference(off, h, x)
    gated = GPT(tiny_default_h())
    gated.load_state_dict(off.state_dict(), strict=False)
    assert not gated.skip_gates.any()  # zero-init (gate 0.5)
    assert not torch.allclose(gated.forward_logits(x), off.forward_logits(x), atol=1e-2)
    names = {n for n, _ in train_gpt.param_groups(gated)["scalar"]}
    assert "skip_gates" in names
    assert GPT(tiny_h(unet_skips=False, skip_gates=True)).skip_gates is None  # dormant without the skips it gates
    monkeypatch.setattr(GPT, "add_skip", lambda self, x, s, j: torch.lerp(self.skip_weights[j] * s, x, 0.5))
    with pytest.raises(AssertionError):
        assert_matches_reference(off, h, x)


def test_skip_gates_at_init_mix_half_the_stream_and_half_the_weighted_skip():
    """Decoder entry j reads sigmoid(0) * x + (1 - sigmoid(0)) * w_j * skip = 0.5 * x + 0.5 * w_j * skip (LIFO)."""
    torch.manual_seed(0)
    model = randomized(GPT(tiny_h(num_layers=4, skip_gates=True)))
    with torch.no_grad():
        model.skip_gates.zero_()
    outs, ins = [], []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: ins.append(args[0]))
        block.register_forward_hook(lambda m, args, out: outs.append(out))
    model.forward_logits(torch.randint(0, 1024, (2, 16)))
    w = model.skip_weights.detach()
    torch.testing.assert_close(ins[2], 0.5 * outs[1] + 0.5 * w[0] * outs[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ins[3], 0.5 * outs[2] + 0.5 * w[1] * outs[0], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        model.skip_gates.fill_(2.0)  # sigmoid(2) of the stream, the rest of the skip
    ins.clear(), outs.clear()
    model.forward_logits(torch.randint(0, 1024, (2, 16)))
    g = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(ins[3], g * outs[2] + (1 - g) * w[1] * outs[0], rtol=1e-5, atol=1e-5)


# ---- SmearGate -------------------------------------------------------------------------------------------


def test_smear_gate_blends_the_previous_position_but_never_across_bos():
    torch.manual_seed(0)
    smear = train_gpt.SmearGate(8, BOS)
    with torch.no_grad():
        smear.gate.copy_(torch.randn(8))
    ids = torch.tensor([[5, 6, BOS, 7, 8]])
    x = torch.randn(1, 5, 8)
    g = torch.sigmoid(smear.gate)
    out = smear(x, ids)
    torch.testing.assert_close(out[0, 1], (1 - g) * x[0, 1] + g * x[0, 0])
    torch.testing.assert_close(out[0, 0], (1 - g) * x[0, 0])  # x_{-1} = 0
    assert torch.equal(out[0, 2], x[0, 2])  # the BOS position keeps its own embedding
    x2 = x.clone()
    x2[0, :2] = torch.randn(2, 8)  # change the whole previous document
    assert torch.equal(smear(x2, ids)[0, 2:], out[0, 2:])  # nothing of it reaches the new document
    x2[0, 2] += 1.0
    assert not torch.equal(smear(x2, ids)[0, 3], out[0, 3])  # within a document the blend acts


def _input_smear(window=8, seed=0):
    torch.manual_seed(seed)
    smear = train_gpt.InputSmearGate(window, BOS)
    with torch.no_grad():
        smear.w.copy_(torch.randn(window)), smear.lam.fill_(0.7)
    return smear


def test_input_smear_gate_is_the_identity_at_init_and_reads_the_current_token():
    """e_t <- e_t + lam * sigmoid(w . e_t[:N]) * e_{t-1} (PR #1667): w and lam zero-init, so exactly e at init."""
    smear = _input_smear()  # seeds the generator before any input is drawn
    e, ids = torch.randn(2, 6, 16), torch.tensor([[5, 6, 7, 8, 9, 4]] * 2)
    assert torch.equal(train_gpt.InputSmearGate(8, BOS)(e, ids), e)
    out = smear(e, ids)
    g = 0.7 * torch.sigmoid(e[..., :8] @ smear.w.detach())
    torch.testing.assert_close(out[:, 1:], e[:, 1:] + g[:, 1:, None] * e[:, :-1])
    assert torch.equal(out[:, 0], e[:, 0])  # nothing before the first position
    e2 = e.clone()
    e2[0, 3, :8] += torch.randn(8)  # the current token's gate channels: its coefficient on e_2 changes
    coefficient = lambda o, x: ((o[0, 3] - x[0, 3]) / x[0, 2]).mean()  # noqa: E731
    assert not torch.isclose(coefficient(smear(e2, ids), e2), coefficient(out, e))
    e3 = e.clone()
    e3[0, 3, 8:] += 1.0  # channels outside the window leave the gate alone
    torch.testing.assert_close(coefficient(smear(e3, ids), e3), coefficient(out, e))


def test_input_smear_gate_never_crosses_a_bos():
    """A packed stream: document B starts with BOS right after document A. Changing every token of A leaves B's
    embeddings, x0, unchanged (the records' ungated version, PR #1667, leaked A's last token into B's BOS)."""
    smear = _input_smear(window=12)
    model = randomized(GPT(tiny_h(smear_gate="input", bigram_vocab_size=0)))  # the bigram pair crosses by design
    with torch.no_grad():
        model.smear.load_state_dict(_input_smear(window=12).state_dict())
    x0 = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: x0.append(args[1]))
    ids = torch.randint(2, 1024, (1, 24))
    ids[0, 10] = BOS
    model.forward_logits(ids)
    other = ids.clone()
    other[0, :10] = torch.randint(2, 1024, (10,))
    model.forward_logits(other)
    assert torch.equal(x0[1][0, 10:], x0[0][0, 10:]) and not torch.equal(x0[1][0, 1:10], x0[0][0, 1:10])
    e = torch.randn(1, 24, 16)
    e2 = e.clone()
    e2[0, :10] = torch.randn(10, 16)
    assert torch.equal(smear(e2, ids)[0, 10:], smear(e, ids)[0, 10:])
    ids[0, 10] = 7  # without the BOS the blend does cross
    assert not torch.equal(smear(e2, ids)[0, 10], smear(e, ids)[0, 10])


@pytest.mark.parametrize("smear", ["off", "static", "input"])
def test_smear_gate_each_value_is_its_formula_on_the_default_preset(smear, monkeypatch):
    """On the default preset (input), each SMEAR_GATE value alone gives the reference forward of that gate (off: no
    gate and no parameters); the values differ from each other. Control: the gate without its BOS mask is caught."""
    x = default_ids()
    h = tiny_default_h(smear_gate=smear)
    model = randomized(GPT(h, BOS))
    assert {"off": type(None), "static": train_gpt.SmearGate, "input": train_gpt.InputSmearGate}[smear] is type(model.smear)
    assert_matches_reference(model, h, x)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("smear.")}
    for other in {"off", "static", "input"} - {smear}:
        changed = randomized(GPT(tiny_default_h(smear_gate=other), BOS), seed=1)
        changed.load_state_dict(state, strict=False)
        assert not torch.allclose(changed.forward_logits(x), model.forward_logits(x), atol=1e-2), other
    if smear == "off":  # the control: a gate left on
        model.smear, model.smear_kind = randomized(train_gpt.InputSmearGate(12, BOS)), "input"
    else:
        model.smear.bos_id = -1
    with pytest.raises(AssertionError):
        assert_matches_reference(model, h, x)
    assert {"smear.w", "smear.lam"} <= {n for n, _ in train_gpt.param_groups(GPT(tiny_default_h()))["scalar"]}
    with pytest.raises(ValueError, match="^SMEAR_GATE_WINDOW=8: has no effect unless SMEAR_GATE=input"):
        tiny_h(smear_gate_window=8)
    with pytest.raises(ValueError, match="^SMEAR_GATE='1': must be one of off, static, input"):
        Hyperparameters.from_env({"SMEAR_GATE": "1"})  # the old boolean spelling is refused, not misread


# ---- BigramHash ------------------------------------------------------------------------------------------


def test_bigram_hash_matches_the_records_int32_formula_on_every_pair():
    buckets, vocab = 3072, 1024
    prev, cur = (a.reshape(-1) for a in np.meshgrid(np.arange(vocab), np.arange(vocab), indexing="ij"))
    expected = ((36313 * cur.astype(np.int32)) ^ (27191 * prev.astype(np.int32))) % (buckets - 1)
    ids = torch.from_numpy(np.stack([prev, cur], axis=1))
    got = train_gpt.bigram_hash(ids, buckets)
    assert torch.equal(got[:, 1], torch.from_numpy(expected.astype(np.int64)))
    assert (got[:, 0] == buckets - 1).all()  # position 0: the reserved "no previous token" bucket
    assert got[:, 1].min() >= 0 and got[:, 1].max() <= buckets - 2  # pairs never use the reserved bucket
    assert torch.equal(train_gpt.bigram_hash(ids, buckets), got)  # deterministic


def test_bigram_hash_is_per_row_and_in_range_for_large_vocabularies():
    torch.manual_seed(0)
    ids = torch.randint(0, 65536, (4, 50))
    h = train_gpt.bigram_hash(ids, 1000)
    assert h.min() >= 0 and h.max() <= 999 and (h[:, 0] == 999).all() and (h[:, 1:] < 999).all()
    assert torch.equal(train_gpt.bigram_hash(ids[:, 10:], 1000)[:, 1:], h[:, 11:])  # depends on the pair only


# ---- XSA -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (8, 2), (4, 1)])
def test_xsa_output_has_no_component_along_the_own_value(heads, kv_heads):
    torch.manual_seed(0)
    y, v = torch.randn(2, 16, heads, 32), torch.randn(2, 16, kv_heads, 32)
    out = train_gpt.exclude_self_value(y, v)
    own = v.repeat_interleave(heads // kv_heads, dim=2)  # head h's own value: KV head h // (H / Hkv)
    assert (out * own).sum(-1).abs().max() < 1e-5
    parallel = (y * F.normalize(own, dim=-1)).sum(-1, keepdim=True) * F.normalize(own, dim=-1)
    torch.testing.assert_close(out, y - parallel)  # only the parallel part is removed


def test_xsa_in_the_model_uses_the_value_with_its_value_embedding():
    """Inside attention, the output fed to proj is orthogonal to c_v(x) + ve at each position, for every head."""
    torch.manual_seed(0)
    h = tiny_h(num_heads=4, num_kv_heads=2)
    attn = randomized(GPT(h)).blocks[1].attn
    assert attn.xsa
    x, ve = torch.randn(2, 12, 64), torch.randn(2, 12, 32)
    seen = []
    attn.proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    cos = torch.ones(1, 12, 1, 4)
    attn(x, cos, torch.zeros_like(cos), ve)
    y = seen[0].view(2, 12, 4, 16)
    v = (attn.c_v(x) + ve).view(2, 12, 2, 16).repeat_interleave(2, dim=2)
    assert (y * v).sum(-1).abs().max() < 1e-4
    assert tiny_h(num_layers=4, xsa_last_n=2, ve_layers="3").xsa_layers == [2, 3]
    assert tiny_h().xsa_layers == [0, 1] and tiny_h(xsa_last_n=0).xsa_layers == []


# ---- attention output gates (PR #1667, #1736, #1787) -----------------------------------------------------


def _attn_output(attn, x, cos):
    """The attention output as proj reads it, (B, T, H, D)."""
    seen = []
    handle = attn.proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    attn(x, cos, torch.zeros_like(cos))
    handle.remove()
    return seen[0].view(*x.shape[:2], attn.num_heads, attn.head_dim)


@pytest.mark.parametrize("gate, factor", [("out", 1.0), ("sparse", 0.5), ("dense", 0.5)])
def test_attention_gates_at_init(gate, factor):
    """At init `out` is the identity on each head's output, `sparse` halves it, `dense` about halves it."""
    torch.manual_seed(0)
    h = tiny_h(num_heads=4, num_kv_heads=2)
    plain = randomized(GPT(h)).blocks[1].attn
    gated = GPT(tiny_h(num_heads=4, num_kv_heads=2, attn_gate=gate)).blocks[1].attn
    gated.load_state_dict(plain.state_dict(), strict=False)
    assert gated.gate_w.shape == (4, 64 if gate == "dense" else 12)
    x, cos = torch.randn(2, 12, 64), torch.ones(1, 12, 1, 4)
    y, y_gated = _attn_output(plain, x, cos), _attn_output(gated, x, cos)
    if gate == "dense":  # W ~ N(0, 0.005): |W x| ~ 0.04 for a unit-RMS x, so g = 0.5 +- 0.01
        g = gated.head_gate(x)
        assert (g - 0.5).abs().max() < 0.05 and not torch.equal(g, torch.full_like(g, 0.5))
        torch.testing.assert_close(y_gated, g[..., None] * y)
    else:
        assert torch.equal(y_gated, factor * y)


@pytest.mark.parametrize("gate", ["out", "sparse", "dense"])
def test_attention_gate_is_per_head_and_per_token(gate):
    torch.manual_seed(0)
    attn = randomized(GPT(tiny_h(num_heads=4, num_kv_heads=2, attn_gate=gate))).blocks[0].attn
    x = torch.randn(2, 12, 64)
    g = attn.head_gate(x)
    assert g.shape == (2, 12, 4) and len(set(g[0, 0].tolist())) == 4  # one gate per head
    x2 = x.clone()
    x2[0, 5, :3] += 1.0  # inside every window
    changed = (attn.head_gate(x2) != g).any(-1)
    assert changed[0, 5] and changed.sum() == 1  # only that token's gates move
    z = x[..., : attn.gate_window] @ attn.gate_w.T
    expected = {"out": 2 * torch.sigmoid(z), "sparse": torch.sigmoid(0.5 * z), "dense": torch.sigmoid(z)}[gate]
    torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("gate", ["out", "sparse", "dense"])
def test_attention_gates_none_is_the_ungated_model_and_each_gate_changes_it(gate, monkeypatch):
    """On the default preset, ATTN_GATE=none gives the model whose gated form has W = 0 (gate 2 sigmoid(0) = 1 for
    out, sigmoid(0) = 1/2 for sparse and dense, made up by doubling the output projection): an independent
    expectation, since the gate is then a known constant. Random W changes it. Control: a gate of 0.6 for every
    head (a wrong constant) is caught."""
    x = default_ids()
    off = randomized(GPT(tiny_default_h(attn_gate="none")))  # its gate knobs go dormant: ATTN_GATE alone
    gated = GPT(tiny_default_h(attn_gate=gate))
    gated.load_state_dict(off.state_dict(), strict=False)
    with torch.no_grad():
        for block in gated.blocks:
            block.attn.gate_w.zero_()
            block.attn.proj.weight.mul_(1.0 if gate == "out" else 2.0)
    expected = off.forward_logits(x)
    torch.testing.assert_close(gated.forward_logits(x), expected, rtol=1e-5, atol=1e-5)
    groups = {k: {n for n, _ in v} for k, v in train_gpt.param_groups(gated).items()}
    assert {"blocks.0.attn.gate_w", "blocks.1.attn.gate_w"} <= groups["scalar"]
    assert not any("gate_w" in n for n, _ in off.named_parameters())
    monkeypatch.setattr(train_gpt.CausalSelfAttention, "head_gate",
                        lambda self, x: torch.full((*x.shape[:2], self.num_heads), 0.6))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(gated.forward_logits(x), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    with torch.no_grad():
        for block in gated.blocks:
            block.attn.gate_w.normal_()
    assert not torch.allclose(gated.forward_logits(x), expected, atol=1e-2)


def test_attention_gate_knobs_are_never_silently_ignored():
    with pytest.raises(ValueError, match=r"^ATTN_GATE_WINDOW=8: has no effect unless ATTN_GATE=out\|sparse"):
        tiny_h(attn_gate="dense", attn_gate_window=8)
    with pytest.raises(ValueError, match="^ATTN_GATE_WINDOW=65: must be <= MODEL_DIM=64"):
        tiny_h(attn_gate="out", attn_gate_window=65)
    with pytest.raises(ValueError, match="^ATTN_GATE_SCALE=0.7: has no effect unless ATTN_GATE=sparse"):
        tiny_h(attn_gate="out", attn_gate_scale=0.7)
    assert tiny_h(attn_gate="out").attn_gate_scale == 0.5  # dormant at its own default
    assert tiny_h(attn_gate="sparse", attn_gate_window=8, attn_gate_scale=0.5).attn_gate_window == 8


# ---- partial RoPE ----------------------------------------------------------------------------------------


def test_partial_rope_leaves_the_other_dims_untouched():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 3, 16)
    angles = torch.outer(torch.arange(10.0), 10000.0 ** (-torch.arange(0, 6, 2) / 6))  # rd = 6
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    out = train_gpt.apply_rotary(x, cos, sin)
    assert torch.equal(out[..., 6:], x[..., 6:])
    pair_norm = lambda t: t[..., :3] ** 2 + t[..., 3:6] ** 2  # noqa: E731  (pairs (i, i + 3) rotate)
    torch.testing.assert_close(pair_norm(out), pair_norm(x))
    assert torch.equal(out[:, 0], x[:, 0])  # angle 0 at position 0


def test_rope_base_is_fixed_by_the_configuration_not_the_runtime_length():
    rd, base = Hyperparameters.from_env(SEED_STACK_ENV).rope
    assert rd == 16 and base == pytest.approx(22_082, abs=1)  # the records' NTK base at T=2048 (docs/differences.md)
    assert tiny_h(rope_ntk_len=0).rope[1] == 10000.0
    # a model trained at T=64 with NTK scaling from 16: a short forward must use the same base (the records
    # switched back to the unscaled base for passes of <= 1024 tokens), so prefixes give identical logits
    torch.manual_seed(0)
    model = randomized(GPT(tiny_h(rope_ntk_len=16)))
    x = torch.randint(0, 1024, (1, 64))
    torch.testing.assert_close(model.forward_logits(x[:, :8]), model.forward_logits(x)[:, :8], rtol=1e-5, atol=1e-5)


# ---- MLP activation, LN scale, orthogonal init -----------------------------------------------------------


@pytest.mark.parametrize("act, slope", [("relu2", 0.0), ("leaky_relu2", 0.5), ("leaky_relu2", 0.3)])
def test_mlp_activation(act, slope):
    """phi(u) = u^2 for u > 0 and (s * u)^2 for u <= 0 (s = MLP_LEAKY_SLOPE with leaky_relu2, 0 with relu2)."""
    mlp = train_gpt.MLP(tiny_h(mlp_act=act, mlp_mult=1.0, **({"mlp_leaky_slope": slope} if slope else {})))
    with torch.no_grad():
        mlp.fc.weight.copy_(torch.eye(64))
        mlp.proj.weight.copy_(torch.eye(64))
    x = torch.linspace(-2, 2, 64)[None]
    torch.testing.assert_close(mlp(x), torch.where(x > 0, x**2, (slope * x) ** 2))


def test_mlp_leaky_slope_of_the_default_preset_is_its_formula_and_other_slopes_change_it():
    """Every MLP of the default preset computes proj(phi(fc x)) with phi(u) = u^2 (u > 0), (0.3 u)^2 (u <= 0), and
    MLP_ACT=relu2 with slope 0 there, by hand; the slope changes the logits. Control: a model that kept the
    records' 0.5 fails the hand computation."""
    torch.manual_seed(0)
    ids, u = default_ids(), torch.randn(2, 9, 64)
    for h, slope in ((tiny_default_h(), 0.3), (tiny_default_h(mlp_act="relu2"), 0.0)):
        model = randomized(GPT(h))
        for block in model.blocks:
            a = u @ block.mlp.fc.weight.T
            expected = torch.where(a > 0, a, slope * a).square() @ block.mlp.proj.weight.T
            torch.testing.assert_close(block.mlp(u), expected, rtol=1e-5, atol=1e-5)
    model = randomized(GPT(tiny_default_h()))
    records = randomized(GPT(tiny_default_h(mlp_leaky_slope=0.5)))
    assert not torch.allclose(records.forward_logits(ids), model.forward_logits(ids), atol=1e-2)
    mlp = model.blocks[0].mlp
    mlp.negative_slope = 0.5  # the control
    a = u @ mlp.fc.weight.T
    with pytest.raises(AssertionError):
        torch.testing.assert_close(mlp(u), torch.where(a > 0, a, 0.3 * a).square() @ mlp.proj.weight.T)
    with pytest.raises(ValueError, match="^MLP_LEAKY_SLOPE=0.5: has no effect unless MLP_ACT=leaky_relu2"):
        tiny_h(mlp_act="relu2", mlp_leaky_slope=0.5)  # a knob nothing would read
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
            tiny_h(mlp_leaky_slope=bad)


def test_ln_scale_damps_the_normed_inputs_of_deeper_layers():
    model = GPT(tiny_h(num_layers=4, ve_layers="3"))
    rms = {}

    def record(key):
        def hook(module, args, out):
            rms[key] = args[0].pow(2).mean().sqrt().item()  # the RMS of what the layer reads
        return hook

    for i, block in enumerate(model.blocks):
        block.attn.c_q.register_forward_hook(record(("attn", i)))
        block.mlp.fc.register_forward_hook(record(("mlp", i)))
    model.forward_logits(torch.randint(0, 1024, (2, 16)))
    assert len(rms) == 8
    for (_, i), r in rms.items():
        assert r == pytest.approx((i + 1) ** -0.5, rel=1e-4)
    assert [b.ln_scale for b in GPT(tiny_h(ln_scale=False)).blocks] == [1.0, 1.0]


def test_orthogonal_init():
    h = tiny_h(num_layers=3, ve_layers="2", bigram_dim=64, ve_dim=64, model_dim=128)  # c_k: 64 x 128
    model = GPT(h)
    eye = torch.eye(128)
    for name in ("blocks.0.attn.c_q", "blocks.2.attn.c_k", "blocks.1.mlp.fc"):
        w = model.get_submodule(name).weight
        small = w @ w.T if w.size(0) <= w.size(1) else w.T @ w
        torch.testing.assert_close(small, torch.eye(min(w.shape)), atol=1e-5, rtol=0)
    for name in ("bigram.proj", "ve_shared.proj"):  # gain 1, as PR #1019 (AdamW trains them)
        s = torch.linalg.svdvals(model.get_submodule(name).weight)
        torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)
    assert not model.blocks[0].attn.proj.weight.any() and not model.blocks[0].mlp.proj.weight.any()
    assert not model.bigram.embed.weight.any()
    plain = GPT(tiny_h(ortho_init=False, num_layers=3, ve_layers="2", model_dim=128))
    w = plain.blocks[0].attn.c_q.weight
    assert not torch.allclose(w @ w.T, eye, atol=0.1)  # PyTorch's default init without the knob


# ---- asymmetric logit softcap (PR #1923) -----------------------------------------------------------------


def test_asymmetric_softcap_starts_as_the_symmetric_cap_and_trains_both_scalars():
    """On the default preset (two trained caps): the logits are cap+ tanh(z / cap+) for z >= 0 and cap- tanh(z /
    cap-) below, with z the head's output computed by hand; LOGIT_SOFTCAP_ASYM=0 alone is 30 tanh(z / 30) with two
    parameters fewer. Control: the caps swapped are caught."""
    torch.manual_seed(0)
    h = tiny_default_h()
    x = default_ids(4, 64)
    asym = randomized(GPT(h))
    off = GPT(tiny_default_h(logit_softcap_asym=False))
    off.load_state_dict({k: v for k, v in asym.state_dict().items() if not k.startswith("softcap_")})
    assert sum(p.numel() for p in asym.parameters()) == sum(p.numel() for p in off.parameters()) + 2
    assert GPT(h).softcap_pos.dim() == 0 and GPT(h).softcap_pos.item() == GPT(h).softcap_neg.item() == 30.0
    seen = []
    asym.head_in.register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        asym.softcap_pos.fill_(4.0), asym.softcap_neg.fill_(8.0)
        logits = asym.forward_logits(x)
    z = seen[0] @ asym.tok_emb.weight.T
    assert (z > 0).any() and (z < 0).any() and z.abs().max() > 4
    expected = torch.where(z >= 0, 4 * torch.tanh(z / 4), 8 * torch.tanh(z / 8))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(off.forward_logits(x), 30 * torch.tanh(z / 30), rtol=1e-5, atol=1e-5)
    asym.softcap_pos, asym.softcap_neg = asym.softcap_neg, asym.softcap_pos  # the control
    with pytest.raises(AssertionError):
        torch.testing.assert_close(asym.forward_logits(x), expected, rtol=1e-5, atol=1e-5)
    asym.softcap_pos, asym.softcap_neg = asym.softcap_neg, asym.softcap_pos
    with torch.no_grad():
        asym.softcap_pos.fill_(30.0), asym.softcap_neg.fill_(30.0)
    groups = {k: {n for n, _ in v} for k, v in train_gpt.param_groups(asym).items()}
    assert groups["softcap"] == {"softcap_pos", "softcap_neg"}  # the scalar LR, no weight decay
    opt = train_gpt.Optimizers(h, asym, train_gpt.bank_block_matrices(asym, CPU), CPU)
    caps = next(g for g in opt.adam.param_groups if any(p is asym.softcap_pos for p in g["params"]))
    assert caps["weight_decay"] == 0.0 and caps["lr"] == h.scalar_lr
    asym(x, torch.roll(x, -1, 1)).backward()
    assert asym.softcap_pos.grad != 0 and asym.softcap_neg.grad != 0
    opt.step(1.0, h.muon_momentum)
    assert asym.softcap_pos.item() != 30.0 and asym.softcap_neg.item() != 30.0


# ---- gradients reach the new parameters ------------------------------------------------------------------


def test_skip_weights_bigram_table_and_value_embeddings_receive_gradients():
    torch.manual_seed(0)
    h = tiny_h()
    model = GPT(h)
    opt = train_gpt.Optimizers(h, model, train_gpt.bank_block_matrices(model, CPU), CPU)
    x = torch.randint(0, 1024, (4, 64))
    y = torch.roll(x, -1, 1)
    for _ in range(3):  # the zero-initialised block projections block the value path for the first step
        model(x, y).backward()
        opt.step(1.0, h.muon_momentum)
        opt.zero_grad()
    model(x, y).backward()
    for name in ("skip_weights", "bigram.embed.weight", "ve_shared.embed.weight", "ve_shared.proj.weight",
                 "ve_layer_scales", "smear.gate", "bigram.scale"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert model.bigram.embed.weight.any()  # the zero table has been trained


@pytest.mark.parametrize("gate", ["out", "sparse", "dense"])
def test_frontier_parameters_train_in_the_scalar_group_and_export_in_fp16(gate):
    """Skip gates, attention gates, the input SmearGate and the asymmetric caps all get gradients once the
    zero-initialised paths open (a few steps), are AdamW scalars (never Muon) and are stored in fp16."""
    torch.manual_seed(0)
    h = tiny_h(mlp_leaky_slope=0.3, skip_gates=True, attn_gate=gate, smear_gate="input", logit_softcap_asym=True,
               num_layers=4, quant_gate_bits=16)
    model = GPT(h)
    new = ["skip_gates", "smear.w", "smear.lam", "softcap_pos", "softcap_neg"] + \
        [f"blocks.{i}.attn.gate_w" for i in range(4)]
    groups = train_gpt.param_groups(model)
    scalar = dict(groups["scalar"] + groups["softcap"])  # AdamW at the scalar LR (the caps without decay)
    assert set(new) <= set(scalar)
    assert all(train_gpt.quant_bits(h, n, "scalar", scalar[n].shape) == train_gpt.FP16 for n in new)
    before = {n: scalar[n].detach().clone() for n in new}
    opt = train_gpt.Optimizers(h, model, train_gpt.bank_block_matrices(model, CPU), CPU)
    x = torch.randint(0, 1024, (4, 64))
    x[:, 20] = BOS
    for step in range(4):
        model(x, torch.roll(x, -1, 1)).backward()
        if step < 3:
            opt.step(1.0, h.muon_momentum)
            opt.zero_grad()
    for n in new:
        assert scalar[n].grad.abs().sum() > 0 and not torch.equal(scalar[n].detach(), before[n]), n


def test_a_zero_bigram_projection_would_starve_the_table():
    """Why the projection is re-initialised: with it at zero too, the zero table never gets a gradient."""
    model = GPT(tiny_h())
    with torch.no_grad():
        model.bigram.proj.weight.zero_()
    x = torch.randint(0, 1024, (2, 32))
    model(x, torch.roll(x, -1, 1)).backward()
    assert not model.bigram.embed.weight.grad.any()
