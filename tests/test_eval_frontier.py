"""The frontier evaluator: document-aware windows, per-document LoRA TTT with a phase of global SGD, the token
n-gram tilt and the evaluation compile warm-up. The four conditions of the organisers' ruling (Issue #1017: C1
causal, C2 a normalised distribution, C3 score before update, C4 each target once in one pass) are shown
black-box on a tiny looped model with every evaluation feature on."""

import inspect
import dataclasses
import math

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import FRONTIER_ENV, SP1024, run_distributed, tiny_h

import train_gpt
from train_gpt import Dist

CPU = Dist(0, 1, 0, torch.device("cpu"))
# every evaluation feature on, at a tiny size: 2 layers looped once (4 virtual layers), 3-document batches in 2
# lanes, short-document chunks, one phase after the first 2 batches, the tilt at order 3
LORA = dict(ttt_enabled=True, ttt_mode="lora", ttt_lora_rank=4, ttt_lora_lr=0.01, ttt_batch_size=3,
            ttt_chunk_size=32, ttt_short_score_first_steps="64:8,128:16", ttt_lanes=2, phased_ttt_num_phases=1,
            phased_ttt_prefix_docs=5, ttt_lr=0.01, ttt_chunk_tokens=256, ttt_batch_seqs=2, ttt_epochs=1,
            eval_docs=True, ngram_tilt_enabled=True, token_order=3, num_loops=1, loop_start=0, loop_end=1)


def _luts():
    return train_gpt.build_byte_luts(spm.SentencePieceProcessor(model_file=str(SP1024)), 1024)


@pytest.fixture(scope="module")
def stream(sample_texts) -> np.ndarray:
    """3,001 tokens of real documents cut to 10..159 tokens each (about 35 documents: several batches)."""
    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    docs = [[sp.bos_id()] + sp.encode(t)[: 10 + 37 * i % 150] for i, t in enumerate(sample_texts[:60])]
    return np.concatenate(docs)[:3001].astype(np.uint16)


def _val(tokens):
    return train_gpt.make_validation(tokens, _luts(), 64, tail=True)


def _model(seed=0, **overrides):
    """The tiny model with noise on every weight, so every path carries signal (zero-initialised output
    projections would hide attention)."""
    h = tiny_h(**{**LORA, **overrides})
    torch.manual_seed(seed)
    model = train_gpt.GPT(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return h, model


def _hints(h, val):
    return train_gpt.ngram_hints(val.tokens, h.token_order, h.token_threshold) if h.ngram_tilt_enabled else None


def _lora_eval(val, d=CPU, trace=None, seed=0, **overrides):
    h, model = _model(seed, **overrides)
    return train_gpt.lora_ttt(h, d, model, model, val, trace, hints=_hints(h, val)), model


def _trace(val):
    return torch.zeros(2, val.num_targets, dtype=torch.float64)


def _queue(h, val):
    """lora_ttt's queue: batches of document indices, longest first."""
    bounds = train_gpt.doc_bounds(val.tokens, val.bos_id)
    order = np.argsort(np.diff(bounds), kind="stable")
    return bounds, [order[i : i + h.ttt_batch_size] for i in range(0, len(order), h.ttt_batch_size)][::-1]


def test_the_tail_option_scores_the_whole_stream(stream):
    assert train_gpt.make_validation(stream[:1001], _luts(), 64).num_targets == 960  # whole sequences
    assert _val(stream[:1001]).num_targets == 1000


@pytest.mark.parametrize("stride", [64, 16])
def test_document_windows_read_only_their_own_document(stream, stride):
    """Every target scored once; replacing every token of one document leaves every other target's score
    bit-identical (the stream windows do not: they read across the boundary)."""
    val = _val(stream)
    bounds = train_gpt.doc_bounds(val.tokens, val.bos_id)
    assert val.tokens[bounds[1:-1]].tolist() == [val.bos_id] * (len(bounds) - 2) and len(bounds) > 8
    h, model = _model(ngram_tilt_enabled=False, token_order=16)
    j = 3
    lo, hi = bounds[j], bounds[j + 1]  # document j's targets; its inputs are tokens lo .. hi - 1
    changed = val.tokens.copy()
    changed[lo + 1 : hi] = np.random.default_rng(0).integers(2, 1024, hi - lo - 1)
    other = _val(changed)
    for docs in (True, False):
        a, b = _trace(val), _trace(val)
        for v, t in ((val, a), (other, b)):
            r = train_gpt.evaluate(h, CPU, model, v, train_gpt.Windows(64, stride, 4), trace=t, docs=docs)
            assert torch.equal(t[0], torch.ones(val.num_targets)) and r.tokens == val.num_targets
        keep = torch.ones(val.num_targets, dtype=torch.bool)
        keep[lo - 1 : hi] = False  # the target before lo is the BOS of document j: its token did not change
        assert torch.equal(a[1, keep], b[1, keep]) == docs


def test_document_windows_at_stride_equal_to_the_window_cut_each_document_from_its_start():
    bounds = np.array([0, 10, 150, 151, 300])
    wins = train_gpt.eval_windows(bounds, 64, 64)
    first = wins[:, 0] + wins[:, 1] - wins[:, 2]
    assert first.tolist() == [0, 10, 74, 138, 150, 151, 215, 279]  # pieces of 64 from each document's start
    assert np.all(wins[:, 0] >= np.repeat(bounds[:-1], [1, 3, 1, 3]))  # never before the document
    assert wins[:, 2].sum() == 300 and wins[:, 1].max() == 64


def test_fresh_adapters_change_nothing_and_each_row_and_virtual_layer_has_its_own():
    h, model = _model()
    lora = train_gpt.BatchedLoRA(h, 2, torch.device("cpu"))
    lora.reset(torch.Generator().manual_seed(0))
    x = torch.randint(0, 1024, (2, 32))
    with torch.no_grad():
        plain = model.forward_logits(x)
        assert torch.equal(model.forward_logits(x, lora=lora), plain)
        assert set(lora.A) == {"k", "o", "mlp", "head"} and lora.A["k"].shape[0] == 4  # no_qv; 4 virtual layers
        lora.B["mlp"][2, 1].normal_()  # row 1's adapter at the second visit of layer 0
        second = model.forward_logits(x, lora=lora)
        assert torch.equal(second[0], plain[0]) and not torch.equal(second[1], plain[1])
        lora.B["mlp"].zero_()
        lora.B["mlp"][0, 1].normal_()  # the first visit instead: another function
        assert not torch.allclose(model.forward_logits(x, lora=lora)[1], second[1])


@pytest.mark.parametrize("mask, per_doc", [("no_qv", 4_526_080), ("all", 6_963_200), ("no_k", 5_918_720)])
def test_adapter_parameters_per_document_are_the_records(mask, per_doc):
    """The frontier preset's adapters (rank 80, 17 virtual layers, d=512, KV 256, vocabulary 8192)."""
    h = train_gpt.Hyperparameters.from_env({**FRONTIER_ENV, "TTT_ENABLED": "1", "TTT_MODE": "lora",
                                            "TTT_MASK": mask, "TTT_LORA_RANK": "80"})
    lora = train_gpt.BatchedLoRA(h, 24, torch.device("meta"))
    assert sum(p.numel() for p in lora.parameters()) == 24 * per_doc


def test_lora_ttt_scores_depend_only_on_the_stream_before_and_on_documents_scored_before(stream):
    """C1/C3 black-box, every feature on: target u of document D (in a batch after the phase pause and after
    earlier batches of its lane) keeps a bit-identical score when every token is replaced except the stream up
    to u's token (its context and the n-gram hints read those) and the documents of batches queued before D's
    (scored earlier: the phase SGD and the lane's warm-start A read those). Its batch companions, the later
    queue and the rest of D change. C4: every target scored once."""
    val = _val(stream)
    h, _ = _model()
    bounds, queue = _queue(h, val)
    k = 4  # after the pause at 2 batches; lane 0 ran batch 2 before it
    D = int(queue[k][-1])
    u = bounds[D] + (bounds[D + 1] - bounds[D]) // 2  # a target in the middle of D
    keep = np.zeros(len(val.tokens), dtype=bool)
    keep[: u + 2] = True  # the stream up to target u's token, tokens[u + 1]
    for doc in np.concatenate(queue[:k]):
        keep[bounds[doc] : bounds[doc + 1] + 1] = True
    keep |= val.tokens == val.bos_id  # the documents stay where they are, so the queue is the same
    changed = val.tokens.copy()
    changed[~keep] = np.random.default_rng(1).integers(2, 1024, (~keep).sum())
    a, b = _trace(val), _trace(val)
    _lora_eval(val, trace=a)
    _lora_eval(_val(changed), trace=b)
    assert torch.equal(a[0], torch.ones(val.num_targets)) and torch.equal(b[0], a[0])
    assert torch.equal(a[1, bounds[D] : u + 1], b[1, bounds[D] : u + 1])
    assert not torch.equal(a[1, u + 1 : bounds[D + 1]], b[1, u + 1 : bounds[D + 1]])
    for doc in queue[k][:-1]:  # a companion's changed tokens change its own scores only
        assert not torch.equal(a[1, bounds[doc] : bounds[doc + 1]], b[1, bounds[doc] : bounds[doc + 1]])


def test_the_phase_sgd_trains_only_on_documents_already_scored(stream, monkeypatch):
    val = _val(stream)
    h, _ = _model()
    bounds, queue = _queue(h, val)
    trace, seen = _trace(val), []
    sgd = train_gpt.global_sgd

    def spy(h, d, model, base, val, docs):
        seen.append((docs.copy(), trace[0].clone()))
        return sgd(h, d, model, base, val, docs)

    monkeypatch.setattr(train_gpt, "global_sgd", spy)
    _lora_eval(val, trace=trace)
    [(docs, counted)] = seen
    scored = np.concatenate(queue[:2])  # the pause after ceil(5 / 3) = 2 batches
    lengths = np.diff(bounds)
    assert len(docs) == 5 and set(docs[:, 0]) <= set(bounds[scored])
    assert sorted(lengths[scored])[:5] == docs[:, 1].tolist()  # the 5 shortest of them, shortest first
    for s, n in docs:
        assert torch.equal(counted[s : s + n], torch.ones(n, dtype=torch.float64))  # already in the sums
    assert counted.sum() == sum(lengths[scored])  # and nothing else was scored yet


def test_the_phase_sgd_stream_is_its_documents_each_with_its_last_target(stream, monkeypatch):
    """The phase's SGD trains on its documents back to back, each with its last target (the next document's BOS),
    so two BOS meet at each join, as in PR #2014; attention is cut at each BOS. Issue 28 measured this stream
    against one BOS at each join: better, by 1e-6 to 1.5e-5 bpb, in four of four paired runs."""
    val = _val(stream)
    seen, adapt = [], train_gpt.ScoreFirstTTT.adapt
    monkeypatch.setattr(train_gpt, "global_sgd", lambda *a, sgd=train_gpt.global_sgd: seen.append(a[-1]) or sgd(*a))
    monkeypatch.setattr(train_gpt.ScoreFirstTTT, "adapt",
                        lambda self, tokens, *a: seen.append((tokens, a[-1])) or adapt(self, tokens, *a))
    _lora_eval(val)
    docs, (tokens, bos_id) = seen[0], seen[1]
    assert len(docs) == 5 and bos_id == val.bos_id and all(t is tokens and b == bos_id for t, b in seen[2:])
    assert np.array_equal(tokens, np.concatenate([val.tokens[s : s + n + 1] for s, n in docs]))
    assert ((tokens[1:] == val.bos_id) & (tokens[:-1] == val.bos_id)).sum() == len(docs) - 1


def test_the_tilted_adapted_distribution_sums_to_one_over_the_vocabulary():
    """C2: at random positions, exp(-loss) over every possible target is a distribution, through trained adapters."""
    h, model = _model()
    V = h.vocab_size
    lora = train_gpt.BatchedLoRA(h, V, torch.device("cpu"))
    lora.reset(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in lora.B:  # one trained-like adapter in every row
            lora.A[t].copy_(lora.A[t][:, :1].expand_as(lora.A[t]))
            lora.B[t].copy_(torch.randn(lora.B[t][:, :1].shape).expand_as(lora.B[t]) * 0.3)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, V, 24)).expand(V, 24)
    for p, hint in ((5, int(x[0, 6])), (17, 3), (23, -1)):
        y = x.roll(-1, 1).clone()
        y[:, p] = torch.arange(V)  # every possible target at position p
        hints = torch.full_like(y, -1)
        hints[:, p] = hint
        with torch.no_grad():
            loss, tilted = model(x, y, reduction="none", lora=lora, hints=(hints, h.token_boost))
        assert abs(torch.exp(-tilted[:, p].double()).sum().item() - 1) < 1e-6
        assert torch.equal(tilted[:, p], loss[:, p]) if hint < 0 else tilted[hint, p] < loss[hint, p] - 1


def _lora_rank(rank, world_size, tokens):
    trace = torch.zeros(2, 3000, dtype=torch.float64)
    r, model = _lora_eval(_val(tokens), d=Dist(rank, world_size, 0, torch.device("cpu")), trace=trace)
    return r, trace, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.slow  # two gloo ranks
def test_lora_ttt_on_two_ranks_matches_one_rank(stream):
    """C4 on 1 and 2 ranks, and the same scores and weights bit for bit: the lanes give each document the same
    adapters whatever the world size, and the phase SGD the same sequences (one row each) and sums."""
    r1, t1, w1 = _lora_rank(0, 1, stream)
    for r, t, w in run_distributed(_lora_rank, 2, stream):
        assert torch.equal(t[0], torch.ones(3000)) and (r.tokens, r.bytes) == (r1.tokens, r1.bytes)
        assert torch.equal(t[1], t1[1]) and torch.equal(w, w1)
        assert math.isclose(r.val_loss, r1.val_loss, rel_tol=1e-12)


def test_lora_ttt_learns_within_a_document_and_the_phase_and_tilt_add():
    """Documents that repeat a random passage: per-document adapters lower the loss below the document windows,
    and the tilt (hints fire on the repeats) lowers it further."""
    rng = np.random.default_rng(2)
    docs = [np.concatenate(([1], np.tile(rng.integers(2, 1024, 40), 5))) for _ in range(12)]
    val = _val(np.concatenate(docs + [[1]]).astype(np.uint16))
    h, model = _model(ngram_tilt_enabled=False, token_order=16)
    windows = train_gpt.evaluate(h, CPU, model, val, train_gpt.Windows(64, 64, 4), docs=True)
    lora, _ = _lora_eval(val, ngram_tilt_enabled=False, token_order=16)
    tilted, _ = _lora_eval(val)
    assert lora.val_loss < windows.val_loss - 0.2 and tilted.val_loss < lora.val_loss - 0.2, \
        (windows.val_loss, lora.val_loss, tilted.val_loss)


def test_every_lora_ttt_knob_changes_the_result(stream):
    """Each knob is read: the score moves, over exactly the same targets. A direction is not a property of these
    knobs (a rank, a mask or a learning rate can help or hurt a random tiny model), so the defining properties live
    in their own tests (exactly-once scoring, score-before-train, the tilt's formula, the lanes' independence)."""
    val = _val(stream[:1201])
    base, _ = _lora_eval(val)
    for knob, value in dict(ttt_lora_rank=2, ttt_lora_alpha=10.0, ttt_lora_lr=0.02, ttt_local_lr_mult=0.5,
                            ttt_beta1=0.5, ttt_beta2=0.9, ttt_weight_decay=5.0, ttt_mask="all",
                            ttt_warm_start_a=False, ttt_batch_size=2, ttt_chunk_size=16,
                            ttt_short_score_first_steps="", ttt_lanes=1, phased_ttt_num_phases=2,
                            phased_ttt_prefix_docs=3, ttt_lr=0.1, token_order=4, token_threshold=0.5,
                            token_boost=1.0, ngram_tilt_enabled=False).items():
        r, _ = _lora_eval(val, **{knob: value}, **({"token_order": 16} if knob == "ngram_tilt_enabled" else {}))
        assert r.val_loss != base.val_loss, knob
        assert (r.tokens, r.bytes) == (base.tokens, base.bytes)


def test_the_eval_warmup_reads_no_validation_data_and_keeps_the_weights():
    """It is given no validation data (its signature), and compiles the graphs the evaluators use: afterwards
    the document windows, LoRA TTT and the phase SGD compile nothing new."""
    assert not {"val", "tokens", "hints"} & set(inspect.signature(train_gpt.eval_warmup).parameters)
    h, model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    torch._dynamo.reset()
    dyn = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    train_gpt.eval_warmup(h, CPU, model, dyn, model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    warm = counter.frame_count
    val = train_gpt.make_validation(np.tile(np.concatenate(([1], np.arange(2, 300))), 8).astype(np.uint16), _luts(),
                                   64, tail=True)
    train_gpt.evaluate(h, CPU, dyn, val, train_gpt.Windows(64, 64, 4), docs=True, hints=_hints(h, val))
    train_gpt.lora_ttt(h, CPU, dyn, model, val, hints=_hints(h, val))
    assert counter.frame_count == warm > 0
    # without diagnostics only the scored evaluator's graphs: fewer, and LoRA TTT still compiles nothing new
    counter, h = CompileCounter(), dataclasses.replace(h, eval_diagnostics=False)
    torch._dynamo.reset()
    dyn = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    train_gpt.eval_warmup(h, CPU, model, dyn, model)
    assert 0 < counter.frame_count < warm
    lora = counter.frame_count
    train_gpt.lora_ttt(h, CPU, dyn, model, val, hints=_hints(h, val))
    assert counter.frame_count == lora


def test_lora_ttt_knobs_are_refused_unless_lora_ttt_reads_them():
    with pytest.raises(train_gpt.ConfigError, match="TTT_LORA_RANK=.*unless TTT_ENABLED=1 and TTT_MODE=lora"):
        tiny_h(ttt_lora_rank=8)
    with pytest.raises(train_gpt.ConfigError, match="TOKEN_BOOST=.*unless NGRAM_TILT_ENABLED=1"):
        tiny_h(token_boost=1.0)
    with pytest.raises(train_gpt.ConfigError, match="TTT_SHORT_SCORE_FIRST_STEPS"):
        tiny_h(**{**LORA, "ttt_short_score_first_steps": "256-8"})
    with pytest.raises(train_gpt.ConfigError, match="TTT_SHORT_SCORE_FIRST_STEPS=.*CHUNK <= EVAL_SEQ_LEN=64"):
        tiny_h(**{**LORA, "ttt_short_score_first_steps": "256:128"})


def test_a_phase_sgd_with_nothing_to_train_on_is_a_configuration_error():
    """The phase SGD trains on every TTT_CHUNK_TOKENS chunk of its documents but the last: documents of one chunk
    or less are an error naming the knobs (the script raises it before training), a second chunk is enough, and
    a prefix that covers every document (no SGD: nothing left to score) is no error."""
    lengths = [100, 50, 300, 200]  # batches of 2 longest first: [300, 200], then the pause, then [100, 50]
    tokens = np.concatenate([[1] + [5] * (n - 1) for n in lengths] + [[1]]).astype(np.uint16)
    val = train_gpt.ValidationData(tokens, None, 64, 0)
    h = lambda **kw: tiny_h(**{**LORA, "ttt_batch_size": 2, "phased_ttt_prefix_docs": 1, **kw})  # noqa: E731
    queue, cuts, [docs] = train_gpt.ttt_plan(h(), np.array(lengths))
    assert [q.tolist() for q in queue] == [[3, 2], [1, 0]] and cuts == [0, 1, 2] and docs.tolist() == [3]
    with pytest.raises(train_gpt.ConfigError, match=r"^TTT_CHUNK_TOKENS=256: .* gets 200 tokens, one chunk or less"):
        train_gpt.check_ttt_phases(h(ttt_chunk_tokens=256), val)
    with pytest.raises(train_gpt.ConfigError, match="TTT_CHUNK_TOKENS=200"):
        train_gpt.check_ttt_phases(h(ttt_chunk_tokens=200), val)
    train_gpt.check_ttt_phases(h(ttt_chunk_tokens=199), val)  # two chunks: the first trains
    train_gpt.check_ttt_phases(h(ttt_chunk_tokens=256, phased_ttt_prefix_docs=3), val)  # after 2 batches: none left
    train_gpt.check_ttt_phases(tiny_h(ttt_enabled=True, ttt_mode="lora", phased_ttt_num_phases=0), val)  # no phase


def test_the_phase_boundary_is_counted_in_documents():
    """A queue whose first batch is short (50 documents in batches of 8: 2, then 8s) still gives the phase SGD
    every document PHASED_TTT_PREFIX_DOCS asks for, the shortest of those scored before the pause; a prefix
    below the number of phases gives the first pause none."""
    lengths = np.arange(100, 150)
    h = lambda **kw: tiny_h(**{**LORA, "ttt_batch_size": 8, **kw})  # noqa: E731
    queue, cuts, [docs] = train_gpt.ttt_plan(h(phased_ttt_prefix_docs=3), lengths)
    assert [len(b) for b in queue] == [2] + [8] * 6 and cuts == [0, 2, 7]
    assert docs.tolist() == [40, 41, 42]  # scored: the 2 longest, then 40..47; its 3 shortest
    queue, cuts, [docs] = train_gpt.ttt_plan(h(phased_ttt_prefix_docs=2), lengths)
    assert cuts == [0, 1, 7] and docs.tolist() == [48, 49]
    queue, cuts, (none, docs) = train_gpt.ttt_plan(h(phased_ttt_prefix_docs=1, phased_ttt_num_phases=2), lengths)
    assert cuts == [0, 0, 1, 7] and len(none) == 0 and docs.tolist() == [48]


def test_eval_costs_count_each_evaluators_windows_and_steps():
    """Two documents of 100 and 50 targets, one a batch: the FLOPs eval_costs projects, written out window by
    window."""
    h = tiny_h(**{**LORA, "ttt_chunk_tokens": 64, "eval_stride": 64, "ttt_batch_size": 1, "phased_ttt_prefix_docs": 1})
    val = train_gpt.ValidationData(np.array([1] + [5] * 99 + [1] + [5] * 50, dtype=np.uint16), None, 64, 0)
    mm, k = train_gpt.forward_flops_per_token(h, 1)
    f = lambda w: w * mm + k * w * (w + 1) / 2  # noqa: E731  a causal pass over w tokens
    lora = 3 * (f(16) + f(32) + f(48) + 3 * f(64)) + f(64)  # the 100: chunk 16 (101 <= 128), 7 chunks, last untrained
    lora += 3 * (f(8) + f(16) + f(24) + f(32) + f(40) + f(48)) + f(50)  # the 50: chunk 8 (51 <= 64), 7 chunks
    sgd = (math.ceil(100 / 64) - 1) * 1 * 3 * f(64)  # the phase after the first batch: the 100, all chunks but the last
    costs = train_gpt.eval_costs(h, val)
    expected = {"roundtrip": 3 * f(64), "doc_window": 2 * f(64) + f(50), "ngram_hints": 0, "legal_ttt": lora + sgd}
    assert list(costs) == list(expected)
    assert costs["ngram_hints"][1] == train_gpt.ANCHOR_HINTS_S * val.num_targets / train_gpt.OFFICIAL_TARGETS
    for name, (flops, seconds) in costs.items():
        assert math.isclose(flops, expected[name], rel_tol=1e-12), name
        if name in ("roundtrip", "doc_window"):
            assert math.isclose(seconds, flops / (8 * train_gpt.H100_BF16_FLOPS * train_gpt.EVAL_MFU["windows"]))
    assert train_gpt.eval_costs(dataclasses.replace(h, eval_diagnostics=False), val).keys() == {"ngram_hints", "legal_ttt"}


def test_the_default_record_run_fits_both_clocks_at_the_records_measured_times():
    """The evaluation projection of the defaults is PR #2140's measured 553 s (hints and LoRA TTT, its slowest
    seed) per official target count, on any documents; a costlier evaluator projects more, by its FLOPs; training
    stops GPTQ_RESERVE_SECONDS early, more than PR #1855's measured Hessian collection (4.9 s) needs."""
    val = train_gpt.ValidationData(np.concatenate([[1] + [5] * (n - 1) for n in range(40, 4000, 37)] + [[1]])
                                   .astype(np.uint16), None, 64, 0)
    h, n = train_gpt.Hyperparameters(), val.num_targets
    costs = train_gpt.eval_costs(h, val)
    assert list(costs) == ["ngram_hints", "legal_ttt"]  # no diagnostics by default
    total = sum(s for _, s in costs.values()) * train_gpt.OFFICIAL_TARGETS / n
    assert math.isclose(total, 553.0) and total <= 570
    slower = train_gpt.eval_costs(dataclasses.replace(h, ttt_chunk_size=48, ttt_short_score_first_steps="256:8"), val)
    assert slower["legal_ttt"][1] / costs["legal_ttt"][1] == slower["legal_ttt"][0] / costs["legal_ttt"][0] > 1.1
    assert h.loop_cap_ms / 1000 + 4.9 < h.max_wallclock_seconds
