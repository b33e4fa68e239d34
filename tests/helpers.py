"""The helpers the test modules share (one module: test modules never import each other): the CPU Dist, randomized
weights, the quantizer tests' tiny state, the tokenizer rewrite of the byte audit, and the default preset (the
frontier) at a tiny size with a reference forward written out from its description."""

import dataclasses
import types

import torch
import torch.nn.functional as F

import train_gpt
from train_gpt import GPT, Dist, Hyperparameters

CPU = Dist(0, 1, 0, torch.device("cpu"))


def dormant(values: dict) -> set[str]:
    """The knobs (field names) whose `needs` fail under these field values, the others at their defaults: what a
    user switching a technique off would leave unset."""
    fields = dataclasses.fields(Hyperparameters)
    h = types.SimpleNamespace(**{f.name: values.get(f.name, f.default) for f in fields})
    return {f.name for f in fields if f.metadata.get("needs") and not Hyperparameters.holds(h, f.metadata["needs"])}


def randomized(model: GPT, seed: int = 0) -> GPT:
    """Replace every parameter with noise: the zero-initialised projections would hide attention leaks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


# ---- the quantizer's tiny state (test_quant, test_rans, test_pergroup) ---------------------------------------


def quant_h(**kw):
    from conftest import tiny_h

    return tiny_h(model_dim=128, num_heads=4, num_kv_heads=2, **kw)


def quant_state(h, seed=0):
    model = randomized(GPT(h), seed)
    kinds = {n: k for k, members in train_gpt.param_groups(model).items() for n, _ in members}
    return model, model.state_dict(), kinds


# ---- a SentencePiece model with one piece marked unused (test_audit_bytes, test_config) ----------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        value |= (buf[i] & 0x7F) << shift
        shift, i = shift + 7, i + 1
        if buf[i - 1] < 0x80:
            return value, i


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def mark_piece_unused(model: bytes, piece_id: int) -> bytes:
    """Rewrite a serialized ModelProto (the protobuf package is not needed): field 1 holds the pieces in id
    order; appending field 3 (type) = 5 (UNUSED) to one of them overrides its type, as the last value wins."""
    out, i, index = bytearray(), 0, 0
    while i < len(model):
        key, j = _varint(model, i)
        if key & 7 == 2:  # length-delimited
            n, start = _varint(model, j)
            j = start + n
        else:
            j = _varint(model, j)[1] if key & 7 == 0 else j + {1: 8, 5: 4}[key & 7]
        if key == (1 << 3 | 2) and index == piece_id:
            body = model[start:j] + bytes([3 << 3]) + _put_varint(5)
            out += _put_varint(key) + _put_varint(len(body)) + body
        else:
            out += model[i:j]
        index += key == (1 << 3 | 2)
        i = j
    return bytes(out)



# ---- the default preset at a tiny size ---------------------------------------------------------------------

# The size knobs of a 4-layer d=64 model on sp1024; what follows the size derives from them: the loop on the middle
# layers 1..2 (twice more), lanes on the last layer, a 16 -> 32 -> 64 training context, 64-token evaluation.
# Everything else is the default preset's: skip gates, the sparse attention gate, the input SmearGate, XSA on every
# layer, the asymmetric softcap, partial RoPE, LN scale, leaky-relu^2 with slope 0.3, document packing.
TINY_DEFAULT = dict(vocab_size=1024, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, train_seq_len=64,
                    train_batch_tokens=2048, val_batch_size=16384, seq_change_warmup_steps=1, rope_dims=8,
                    device="cpu", max_wallclock_seconds=0.0, seed=1234)


def tiny_default_h(**overrides) -> Hyperparameters:
    """Hyperparameters() (the default preset) at TINY_DEFAULT's size, with overrides."""
    return Hyperparameters(**{**TINY_DEFAULT, **overrides})


BOS = 1


def reference_logits(model: GPT, h: Hyperparameters, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits computed from the techniques' descriptions (README, the PRs), each one applied only where
    h switches it on, with the model's own parameters; the blocks run as units (Block.forward and Block.parallel
    have their own tests against hand-made examples). Written independently of GPT.forward_logits, so an off switch
    that leaves a technique on, or an on switch that misapplies it, shows as a difference."""
    e = F.embedding(ids, model.tok_emb.weight)
    not_bos = (ids != BOS).float()[..., None]
    previous = lambda t: torch.cat((torch.zeros_like(t[:, :1]), t[:, :-1]), dim=1)  # noqa: E731  t_{-1} = 0
    if h.bigram_vocab_size:
        e = e + model.bigram(ids)
    if h.smear_gate == "input":  # PR #1667 / #1851: e_t + lam * sigmoid(w . e_t[:N]) * e_{t-1}, never at a BOS
        gate = model.smear.lam * torch.sigmoid(e[..., : h.smear_gate_window] @ model.smear.w)
        e = e + gate[..., None] * not_bos * previous(e)
    x = F.rms_norm(e, (h.model_dim,))
    if h.smear_gate == "static":  # PR #1019: (1 - g) x_t + g x_{t-1}, g = sigmoid(gate), 0 at a BOS
        g = torch.sigmoid(model.smear.gate) * not_bos
        x = (1 - g) * x + g * previous(x)
    x0 = x
    rd, base = h.rope_dims or h.head_dim, h.rope_base  # no NTK scaling in these configurations
    assert h.rope_ntk_len == 0
    angles = torch.arange(ids.size(1), dtype=torch.float32)[:, None] * base ** (-torch.arange(0, rd, 2) / rd)[None]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    layers = list(range(h.num_layers))
    if h.num_loops:  # PR #1493: LOOP_START..LOOP_END run 1 + NUM_LOOPS times
        a, b = h.loop[0], h.loop[1] + 1
        layers = layers[:a] + layers[a:b] * (1 + h.num_loops) + layers[b:]
    half = len(layers) // 2 if h.unet_skips else 0
    ve_layers = train_gpt.layer_list(h.ve_layers, h.num_layers)
    ve = model.ve_shared(ids) if ve_layers else None
    encoder_outputs, lane1 = [], None
    for j, i in enumerate(layers):
        if j >= half and h.parallel_from and i >= h.parallel_from and lane1 is None:
            lane1 = x  # PR #1529: the lanes split before the skip, which goes to lane 0
        if j >= half and encoder_outputs:
            s = model.skip_weights[j - half] * encoder_outputs.pop()
            if h.skip_gates:  # PR #1218: sigmoid(g) x + (1 - sigmoid(g)) w s
                g = torch.sigmoid(model.skip_gates[j - half])
                x = g * x + (1 - g) * s
            else:
                x = x + s
        block = model.blocks[i]
        vek = ve * model.ve_layer_scales[ve_layers.index(i)] if ve is not None and i in ve_layers else None
        if lane1 is None:
            x = block(x, x0, cos, sin, vek)
        else:
            x, lane1 = block.parallel((x, lane1), x0, model.parallel_post_lambdas[i], model.parallel_resid_lambdas[i],
                                      cos, sin, vek)
        if j < half:
            encoder_outputs.append(x)
    x = F.rms_norm(x if lane1 is None else (x + lane1) / 2, (h.model_dim,))
    z = x @ (model.tok_emb.weight if h.tie_embeddings else model.lm_head.weight).T
    if h.logit_softcap_asym:  # PR #1923: cap+ for z >= 0, cap- below
        return torch.where(z >= 0, model.softcap_pos * torch.tanh(z / model.softcap_pos),
                           model.softcap_neg * torch.tanh(z / model.softcap_neg))
    return h.logit_softcap * torch.tanh(z / h.logit_softcap)


def assert_matches_reference(model: GPT, h: Hyperparameters, ids: torch.Tensor):
    """reference_logits up to fp32 rounding (observed: 1.3e-5 on logits of the order of 1; a technique left on or
    misapplied moves them by more than 1e-2, test_default_preset's controls)."""
    with torch.no_grad():
        torch.testing.assert_close(model.forward_logits(ids), reference_logits(model, h, ids), rtol=1e-5, atol=1e-4)


def default_ids(batch=2, length=48, seed=0) -> torch.Tensor:
    """Tokens of two documents a row (BOS at 0 and at a third), from a seeded generator."""
    ids = torch.randint(2, 1024, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, [0, length // 3]] = BOS
    return ids
