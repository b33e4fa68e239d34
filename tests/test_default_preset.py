"""The default preset's model (the frontier) at a tiny size, by the properties that define it: its forward is the
techniques' descriptions written out (helpers.reference_logits), with every technique on and with each one
switched off; it is causal with every feature on; and its evaluator scores every target exactly once. Each test
carries a control: a deliberate break of the code path it guards, which the same check must catch."""

import types

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import SP1024
from helpers import BOS, CPU, assert_matches_reference, default_ids, randomized, tiny_default_h

import train_gpt
from train_gpt import GPT

# one technique off (or, for value embeddings and an untied head, on) at a time; the rest stay the defaults'
VARIANTS = {
    "defaults": {},
    "skip_gates_off": dict(skip_gates=False),
    "smear_off": dict(smear_gate="off"),
    "smear_static": dict(smear_gate="static"),
    "lanes_off": dict(parallel_start_layer=0),
    "loops_off": dict(num_loops=0),  # LOOP_START/END go dormant
    "softcap_symmetric": dict(logit_softcap_asym=False),
    "value_embeddings": dict(ve_layers="-2,-1"),
    "untied_head": dict(tie_embeddings=False),
}


_ids = default_ids


def _model(h, seed=0):
    """Noise on every weight, the trained caps at distinct values (noise would put them near 0)."""
    model = randomized(GPT(h, BOS), seed)
    if model.softcap_pos is not None:
        with torch.no_grad():
            model.softcap_pos.fill_(4.0), model.softcap_neg.fill_(8.0)
    return model


_matches_reference = assert_matches_reference


def _leave_on(model, technique, monkeypatch):
    """The break of each variant: its switch leaves the technique (or the default's form of it) in the model."""
    if technique == "skip_gates_off":
        model.skip_gates = torch.nn.Parameter(torch.zeros_like(model.skip_weights))
    elif technique == "smear_off":
        model.smear, model.smear_kind = randomized(train_gpt.InputSmearGate(12, BOS)), "input"
    elif technique == "smear_static":  # the static gate without its BOS mask
        model.smear.forward = lambda x, ids: (1 - torch.sigmoid(model.smear.gate)) * x + torch.sigmoid(
            model.smear.gate) * torch.nn.functional.pad(x[:, :-1], (0, 0, 1, 0))
    elif technique == "lanes_off":
        model.parallel_start = 3
        model.parallel_post_lambdas = torch.nn.Parameter(torch.ones(4, 2, 2))
        model.parallel_resid_lambdas = torch.nn.Parameter(torch.full((4, 2), 1.1))
    elif technique == "loops_off":  # layer 1 runs twice
        model.orders = {False: [0, 1, 1, 2, 3], True: [0, 1, 1, 2, 3]}
    elif technique == "softcap_symmetric":
        model.softcap_pos, model.softcap_neg = torch.nn.Parameter(torch.tensor(4.0)), torch.nn.Parameter(torch.tensor(8.0))
    elif technique == "value_embeddings":  # the per-layer scales never applied
        model.ve_layer_scales = torch.nn.Parameter(torch.ones_like(model.ve_layer_scales))
        with torch.no_grad():
            model.ve_shared.scale.fill_(1.0)  # (the reference reads the model's scale: make the layer scales matter)
        model.ve_index = {}
    elif technique == "untied_head":  # the logits from the embedding, the head left unread
        functional = types.SimpleNamespace(**vars(torch.nn.functional))
        functional.linear = lambda x, w, *a: torch.nn.functional.linear(
            x, model.tok_emb.weight if w is model.lm_head.weight else w, *a)
        monkeypatch.setattr(train_gpt, "F", functional)
    else:  # defaults: the input SmearGate without its BOS mask (the records' PR #1667 leak)
        model.smear.bos_id = -1


@pytest.mark.parametrize("technique", VARIANTS)
def test_the_default_preset_forward_is_the_reference_and_a_broken_switch_is_caught(technique, monkeypatch):
    h = tiny_default_h(**VARIANTS[technique])
    model, ids = _model(h), _ids()
    _matches_reference(model, h, ids)
    if technique == "value_embeddings":  # the reference's scales: 1 for the break to show
        with torch.no_grad():
            model.ve_layer_scales.copy_(torch.tensor([0.5, 2.0]))
        _matches_reference(model, h, ids)
    _leave_on(model, technique, monkeypatch)
    with pytest.raises(AssertionError):
        _matches_reference(model, h, ids)


def _shared(src: GPT, dst: GPT) -> GPT:
    """dst with every parameter of src that it has under the same name and shape."""
    mine = dst.state_dict()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in mine and mine[k].shape == v.shape},
                        strict=False)
    return dst


@pytest.mark.parametrize("technique", [t for t in VARIANTS if t != "defaults"])
def test_each_switch_changes_the_default_model(technique):
    """On and off differ by more than the reference's tolerance, with every weight they share equal."""
    on = _model(tiny_default_h())
    off = _shared(on, _model(tiny_default_h(**VARIANTS[technique]), seed=1))
    with torch.no_grad():
        diff = (on.forward_logits(_ids()) - off.forward_logits(_ids())).abs().max()
    assert diff > 1e-2, diff


# ---- causality ---------------------------------------------------------------------------------------------


def _future_changed(model, ids, t):
    """(logits of ids, logits with every token from position t on replaced)."""
    other = ids.clone()
    other[:, t:] = torch.randint(2, 1024, other[:, t:].shape, generator=torch.Generator().manual_seed(t))
    with torch.no_grad():
        return model.forward_logits(ids), model.forward_logits(other)


def _assert_causal(model, ids):
    for t in (1, 17, ids.size(1) - 1):
        a, b = _future_changed(model, ids, t)
        assert torch.equal(a[:, :t], b[:, :t]), t  # positions < t read only tokens < t
        assert not torch.allclose(a[:, t:], b[:, t:]), t


CAUSAL = {**VARIANTS, "unlooped_pass": {}}


@pytest.mark.parametrize("technique", CAUSAL)
def test_the_default_model_is_causal_with_every_feature_on(technique):
    """Skip gates, the sparse attention gate, the input SmearGate, the lanes, the loop, XSA, the asymmetric caps
    (and each with one of them off, value embeddings and an untied head on); the plain pass of a looped model
    (training before ENABLE_LOOPING_AT) too."""
    model = _model(tiny_default_h(**CAUSAL[technique]))
    model.looping = technique != "unlooped_pass" and model.looping
    _assert_causal(model, _ids(length=40))


@pytest.mark.parametrize("leak", ["attention", "input_smear"])
def test_a_future_leak_fails_the_causality_check(leak, monkeypatch):
    """Controls: non-causal attention, and an input SmearGate reading the next position, are caught."""
    model = _model(tiny_default_h())
    if leak == "attention":
        sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            lambda q, k, v, attn_mask=None, is_causal=False, enable_gqa=False: sdpa(
                                q, k, v, enable_gqa=enable_gqa))
    else:
        forward = model.smear.forward
        model.smear.forward = lambda e, ids: forward(e.flip(1), ids.flip(1)).flip(1)
    with pytest.raises(AssertionError):
        _assert_causal(model, _ids(length=40))


def test_a_packed_row_never_reads_across_documents():
    """DOC_PACKING (a default): with the row's segments, the second document's logits do not depend on the first
    document's tokens (attention within documents, the SmearGate's BOS mask); without them they do."""
    model, ids = _model(tiny_default_h()), _ids(batch=1, length=48)
    segments = (torch.from_numpy(train_gpt.cu_seqlens(ids[0].numpy(), BOS, 64)), 64)
    other = ids.clone()
    other[0, 1:16] = torch.randint(2, 1024, (15,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model.forward_logits(ids, segments), model.forward_logits(other, segments)
        assert torch.equal(a[0, 16:], b[0, 16:]) and not torch.allclose(a[0, :16], b[0, :16])
        assert not torch.allclose(model.forward_logits(ids)[0, 16:], model.forward_logits(other)[0, 16:])


# ---- exactly-once scoring on the default evaluator path -----------------------------------------------------


def _stream(sample_texts, n_docs=16):
    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    docs = [[sp.bos_id()] + sp.encode(t)[: 10 + 29 * i % 140] for i, t in enumerate(sample_texts[:n_docs])]
    return np.concatenate(docs + [[sp.bos_id()]]).astype(np.uint16), sp


def _default_eval(sample_texts, trace):
    """The score_artifact evaluator of the defaults (document windows, LoRA TTT with one phase of SGD, the n-gram
    tilt) on the tiny default model; TTT sizes cut to the tiny stream."""
    h = tiny_default_h(ttt_lora_rank=4, ttt_batch_size=3, ttt_lanes=2, phased_ttt_prefix_docs=5, ttt_chunk_tokens=256,
                       ttt_batch_seqs=2, token_order=3)
    assert h.ttt_enabled and h.ttt_mode == "lora" and h.eval_docs and h.ngram_tilt_enabled and h.phased_ttt_num_phases
    tokens, sp = _stream(sample_texts)
    val = train_gpt.make_validation(tokens, train_gpt.build_byte_luts(sp, 1024), h.eval_len, tail=True)
    model = GPT(h, BOS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    hints = train_gpt.ngram_hints(val.tokens, h.token_order, h.token_threshold)
    return train_gpt.lora_ttt(h, CPU, model, model, val, trace, hints=hints), val


def test_the_default_evaluator_scores_every_target_exactly_once(sample_texts, monkeypatch):
    trace = torch.zeros(2, 4000, dtype=torch.float64)
    r, val = _default_eval(sample_texts, trace)
    assert r.tokens == val.num_targets and r.bytes == val.byte_count
    assert torch.equal(trace[0, : val.num_targets], torch.ones(val.num_targets)) and not trace[0, val.num_targets :].any()
    plan = train_gpt.ttt_plan  # control: a batch queued twice is caught by the same checks
    monkeypatch.setattr(train_gpt, "ttt_plan", lambda h, n: (lambda q, c, p: ([q[0], *q], [0, *[x + 1 for x in c[1:]]],
                                                                              p))(*plan(h, n)))
    trace.zero_()
    with pytest.raises(RuntimeError, match="must score every validation target exactly once"):
        _default_eval(sample_texts, trace)
    assert trace[0].max() == 2
