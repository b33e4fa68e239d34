"""Document packing with varlen attention (DOC_PACKING, PR #1530) and the progressive training length
(TRAIN_SEQ_SCHEDULE, SEQ_CHANGE_WARMUP_STEPS, PR #2014): segment boundaries, attention that stays inside a
document, the schedule's parsing, stage choice and LR ramp, the warm-up shapes, and training runs (the knobs
off train bit-identically; on, 1 rank equals 2 ranks)."""

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from conftest import SEED_STACK_ENV, SP1024, TINY_ENV, run_distributed, tiny_h
from helpers import tiny_default_h
from torch._dynamo.testing import CompileCounter

import train_gpt
from train_gpt import ConfigError, Dist, cu_seqlens

CPU = Dist(0, 1, 0, torch.device("cpu"))
BOS = 1


def _padded(bounds: list[int]) -> list[int]:
    return bounds + [bounds[-1]] * (-len(bounds) % 64)


# ---- cu_seqlens ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ids, max_len, bounds", [
    ([1, 5, 5, 1, 5, 1, 5, 5], 64, [0, 3, 5, 8]),  # a segment starts at every BOS
    ([5, 5, 5, 1, 5, 5], 64, [0, 3, 6]),  # the row starts mid-document: position 0 starts a segment too
    ([5] * 6 + [1] + [5] * 9, 4, [0, 4, 6, 10, 14, 16]),  # long documents cut every 4 tokens from their start
    ([1] * 9, 2, list(range(10))),  # back-to-back BOS: one-token documents
    ([5] * 8, 8, [0, 8]),  # one document of exactly the cap
])
def test_cu_seqlens_on_hand_made_rows(ids, max_len, bounds):
    got = cu_seqlens(np.array(ids, dtype=np.uint16), BOS, max_len)
    assert got.dtype == np.int32 and got.tolist() == _padded(bounds)


def test_cu_seqlens_pad_to_a_multiple_of_64_entries_by_repeating_the_total():
    assert len(cu_seqlens(np.ones(63, np.uint16), BOS, 8)) == 64  # 63 starts + the total: no padding
    got = cu_seqlens(np.ones(64, np.uint16), BOS, 8)  # 65 entries -> 128
    assert got.tolist() == list(range(65)) + [64] * 63


# ---- attention within documents -----------------------------------------------------------------------------


def _packed_row(doc_lens: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    docs = [torch.cat((torch.tensor([BOS]), torch.randint(2, 1024, (n - 1,), generator=g))) for n in doc_lens]
    return torch.cat([torch.randint(2, 1024, (5,), generator=g)] + docs)[None]  # starts mid-document


def _model(**overrides) -> train_gpt.GPT:
    torch.manual_seed(0)
    model = train_gpt.GPT(tiny_h(**overrides), bos_id=BOS)
    for p in model.parameters():  # the zero-initialised projections too, so every path carries signal
        torch.nn.init.normal_(p, std=0.1)
    return model


# BigramHash is off: at a BOS it hashes the previous document's last token (as in unpacked rows; the frontier
# dropped BigramHash). SmearGate is on, and masked at every BOS.
NO_BIGRAM = dict(bigram_vocab_size=0)


@pytest.mark.parametrize("smear", ["static", "input"])
def test_replacing_one_document_changes_no_other_documents_logits(smear):
    model, max_len = _model(**NO_BIGRAM, smear_gate=smear), 16
    x = _packed_row([12, 30, 9, 20])  # the second document (positions 17-46) is cut at the cap of 16
    segments = (torch.from_numpy(cu_seqlens(x[0].numpy(), BOS, max_len)), max_len)
    doc = slice(18, 47)  # every token of the second document after its BOS
    y = x.clone()
    y[0, doc] = torch.randint(2, 1024, (29,), generator=torch.Generator().manual_seed(1))
    others = torch.ones(x.size(1), dtype=torch.bool)
    others[doc] = False
    packed_x, packed_y = model.forward_logits(x, segments), model.forward_logits(y, segments)
    torch.testing.assert_close(packed_y[0, others], packed_x[0, others], rtol=0, atol=1e-6)
    assert not torch.allclose(packed_y[0, doc], packed_x[0, doc])
    plain_x, plain_y = model.forward_logits(x), model.forward_logits(y)  # without segments it does leak
    assert (plain_y[0, 47:] - plain_x[0, 47:]).abs().amax() > 1e-3
    torch.testing.assert_close(plain_x[0, :5], packed_x[0, :5], rtol=1e-5, atol=1e-5)  # the first segment


def test_a_cut_document_attends_only_inside_its_pieces():
    model = _model(**NO_BIGRAM, smear_gate="off")  # a SmearGate blends across a cut (the same document)
    x = _packed_row([40])
    a = model.forward_logits(x, (torch.from_numpy(cu_seqlens(x[0].numpy(), BOS, 8)), 8))
    pieces = [model.forward_logits(x[:, s:e]) for s, e in [(0, 5), (5, 13), (13, 21), (21, 29), (29, 37), (37, 45)]]
    torch.testing.assert_close(a, torch.cat(pieces, 1), rtol=1e-5, atol=1e-5)  # every piece a row on its own


@pytest.mark.parametrize("autocast", [False, True])
def test_the_packed_forward_has_no_graph_breaks(autocast):
    model, x = _model(), _packed_row([20, 30, 9])
    segments = (torch.from_numpy(cu_seqlens(x[0].numpy(), BOS, 16)), 16)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            explanation = torch._dynamo.explain(model)(x, x.roll(-1, 1), segments=segments)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_packed_rows_compile_once_per_cu_seqlens_length():
    """New boundaries of the same padded length reuse the graph, another length is one more graph. (The SDPA
    path never reads the cap, so a new cap reuses it too; FA3 varlen gets it as a constant: a graph per stage.)"""
    torch._dynamo.reset()
    counter = CompileCounter()
    model = _model()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    for seed, cap in ((0, 16), (1, 16), (2, 32)):  # other documents, the same 64-entry list
        x = _packed_row([20, 30, 9], seed)
        compiled(x, x.roll(-1, 1), segments=(torch.from_numpy(cu_seqlens(x[0].numpy(), BOS, cap)), cap)).backward()
    assert counter.frame_count == 1
    compiled(x, x.roll(-1, 1), segments=train_gpt.warmup_segments(x.size(1), 32, 128, CPU.device)).backward()
    assert counter.frame_count == 2


# ---- the schedule ---------------------------------------------------------------------------------------------


def test_schedule_parsing():
    parse = lambda text: train_gpt.seq_schedule(text, 3072, 98_304)  # noqa: E731  the full size's micro-batch
    assert parse("1024@0.100,2048@0.700,3072@1.000") == [(1024, 0.1), (2048, 0.7), (3072, 1.0)]
    assert parse("0.333@0.100,0.667@0.700,1.0@1.000") == parse("1024@0.1,2048@0.7,3072@1")  # relative: the same
    assert parse("1024@0.1,3072@0.7") == [(1024, 0.1), (3072, 0.7), (3072, 1.0)]
    assert parse("") == parse(" ") == []
    assert train_gpt.seq_schedule("0.333@0.1,0.667@0.7,1.0@1", 256, 512) == [(64, 0.1), (128, 0.7), (256, 1.0)]
    h = tiny_h(train_seq_schedule="32@0.5,64@1", seq_change_warmup_steps=4)
    assert h.seq_stages == [(32, 0.5), (64, 1.0)] and tiny_h().seq_stages == [(64, 1.0)]


SYNTAX = "must be comma-separated stages L@f (a length, or a fraction of TRAIN_SEQ_LEN such as 0.5, and a training "
DIVIDE = "every L must divide the micro-batch TRAIN_BATCH_TOKENS/8=256 tokens, the largest equal TRAIN_SEQ_LEN=64"


@pytest.mark.parametrize("overrides, message", [
    (dict(train_seq_schedule="64"), f"TRAIN_SEQ_SCHEDULE='64': {SYNTAX}"),
    (dict(train_seq_schedule="64@x"), f"TRAIN_SEQ_SCHEDULE='64@x': {SYNTAX}"),
    (dict(train_seq_schedule="32@0.5@1"), f"TRAIN_SEQ_SCHEDULE='32@0.5@1': {SYNTAX}"),
    (dict(train_seq_schedule="0@0.5,64@1"), "TRAIN_SEQ_SCHEDULE='0@0.5,64@1': every stage L@f needs L > 0 and f in "
                                            "(0, 1]"),
    (dict(train_seq_schedule="32@0,64@1"), "TRAIN_SEQ_SCHEDULE='32@0,64@1': every stage L@f needs L > 0 and f in "
                                           "(0, 1]"),
    (dict(train_seq_schedule="64@1.5"), "TRAIN_SEQ_SCHEDULE='64@1.5': every stage L@f needs L > 0 and f in (0, 1]"),
    (dict(train_seq_schedule="64@0.7,32@0.2"), "TRAIN_SEQ_SCHEDULE='64@0.7,32@0.2': every stage L@f needs L > 0 and f "
                                               "in (0, 1], the fractions f increasing"),
    (dict(train_seq_schedule="32@0.5,64@0.5"), "TRAIN_SEQ_SCHEDULE='32@0.5,64@0.5': every stage L@f needs L > 0 and f "
                                               "in (0, 1], the fractions f increasing"),
    (dict(train_seq_schedule="48@0.5,64@1"), f"TRAIN_SEQ_SCHEDULE='48@0.5,64@1': {DIVIDE}"),
    (dict(train_seq_schedule="32@0.5,128@1"), f"TRAIN_SEQ_SCHEDULE='32@0.5,128@1': {DIVIDE}"),
    (dict(seq_change_warmup_steps=4), "SEQ_CHANGE_WARMUP_STEPS=4: has no effect unless TRAIN_SEQ_SCHEDULE!="),
])
def test_schedule_errors_name_the_variable_and_what_was_expected(overrides, message):
    with pytest.raises(ConfigError) as e:
        tiny_h(**overrides)
    assert message in str(e.value).splitlines()[0] and len(str(e.value).splitlines()) == 1


def test_schedule_error_from_the_environment():
    with pytest.raises(ConfigError, match=r"^TRAIN_SEQ_SCHEDULE='2048@0\.5': every L must divide"):
        train_gpt.Hyperparameters.from_env({**TINY_ENV, "TRAIN_SEQ_SCHEDULE": "2048@0.5"})


def test_the_active_length_is_the_first_stage_whose_fraction_is_not_below_progress():
    h = tiny_h(train_seq_len=128, train_seq_schedule="32@0.100,64@0.700,128@1.000")
    fracs = [0.0, 0.05, 0.1, 0.1 + 1e-9, 0.25, 0.5, 0.7 - 1e-9, 0.7, 0.7 + 1e-9, 0.9, 0.999, 1.0]
    assert [train_gpt.seq_len_at(h, f) for f in fracs] == [32] * 3 + [64] * 5 + [128] * 4
    tail = tiny_h(train_seq_len=32, train_seq_schedule="16@0.2,32@0.6", eval_stride=32)  # (32, 1.0) appended
    assert [train_gpt.seq_len_at(tail, f) for f in (0.2, 0.21, 0.6, 0.61, 1.0)] == [16, 32, 32, 32, 32]
    assert {train_gpt.seq_len_at(tiny_h(), f) for f in fracs} == {64}  # no schedule: TRAIN_SEQ_LEN throughout


def test_lr_ramp_after_a_switch():
    h = tiny_h(train_seq_schedule="32@0.5,64@1", seq_change_warmup_steps=4)
    assert [train_gpt.seq_ramp(h, s, 10) for s in range(10, 16)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert train_gpt.seq_ramp(h, 3, 0) == 1.0  # no switch yet (training starts at the first stage)
    assert train_gpt.seq_ramp(tiny_h(train_seq_schedule="32@0.5,64@1", seq_change_warmup_steps=0), 11, 10) == 1.0


def test_warmup_shapes():
    h = train_gpt.Hyperparameters(num_loops=0, parallel_start_layer=0)  # the record's: 98,304 tokens a rank
    assert train_gpt.warmup_shapes(h) == [(1024, 128), (1024, 192), (1024, 256)] + \
        [(n, e) for n in (2048, 3072) for e in (64, 128, 192, 256)]
    looped = dataclasses.replace(h, num_loops=2)  # PR #2014's 'auto': 1024 and 2048 plain, 2048 and 3072 looped
    assert {n for n, _ in train_gpt.warmup_shapes(looped)} == {1024, 2048}
    assert {n for n, _ in train_gpt.warmup_shapes(looped, True)} == {2048, 3072}
    assert train_gpt.warmup_shapes(train_gpt.Hyperparameters.from_env(SEED_STACK_ENV)) == []  # the warm-up steps compile the one shape
    assert train_gpt.warmup_shapes(tiny_h(train_seq_schedule="32@0.5,64@1")) == [(32, 0), (64, 0)]
    assert train_gpt.warmup_shapes(tiny_h(doc_packing=True, train_batch_tokens=131_072, train_seq_len=64)) == [
        (64, 320)]  # 256 segments at least: one length, above CU_SEQLENS_WARM
    cu, n = train_gpt.warmup_segments(256, 32, 128, CPU.device)
    assert n == 32 and len(cu) == 128 and cu[0] == 0 and (cu[1:] >= cu[:-1]).all() and cu[-1] == 256
    assert (cu.diff() <= 32).all() and int((cu < 256).sum()) + 1 > 64  # needs the 128-entry bucket


# ---- the loader ------------------------------------------------------------------------------------------------


def test_packed_batches_are_the_stream_tokens_and_a_switch_skips_nothing(sample_shards):
    files = sorted(map(str, sample_shards.glob("fineweb_train_*.bin")))
    stream = train_gpt.TokenStream(train_gpt.TrainingData(files, 1024)).take(5 * 257).astype(np.int64)
    plain = train_gpt.DistributedTokenLoader(train_gpt.TrainingData(files, 1024), 0, 1)
    packed = train_gpt.DistributedTokenLoader(train_gpt.TrainingData(files, 1024), 0, 1, bos_id=BOS)
    for i, n in enumerate((32, 32, 64, 32, 64)):  # switches, each after a read-ahead made for the other length
        x, y = plain.next_batch(256, n, CPU.device)
        px, py, (cu, cap) = packed.next_batch(256, n, CPU.device)
        assert px.shape == py.shape == (1, 256) and px[0].tolist() == stream[257 * i : 257 * i + 256].tolist()
        assert torch.equal(px, x.reshape(1, -1)) and torch.equal(py, y.reshape(1, -1)) and x.shape == (256 // n, n)
        assert cap == n and cu.dtype == torch.int32 and cu.tolist() == cu_seqlens(px[0].numpy(), BOS, n).tolist()


# ---- training ----------------------------------------------------------------------------------------------------


def _train(shards, d=CPU, **overrides):
    h = tiny_h(data_path=str(shards), tokenizer_path=str(SP1024), **overrides)
    sp, train_files, val_files = train_gpt.check_inputs(h)
    torch.manual_seed(h.seed)
    model = train_gpt.GPT(h, sp.bos_id())
    lines, val = [], train_gpt.load_validation(h, sp, val_files, d.device)
    result = train_gpt.train(h, d, model, train_gpt.TrainingData(train_files, h.vocab_size), val, lines.append)
    return result, lines, torch.cat([p.detach().flatten() for p in model.parameters()])


PACKED = dict(doc_packing=True, train_seq_schedule="32@0.4,64@1", seq_change_warmup_steps=2, iterations=5)


def _batches_seen(shards, monkeypatch, **knobs):
    """(input ids, segments) of every training forward of a 4-step run of the tiny default preset, and the stream."""
    h = tiny_default_h(data_path=str(shards), tokenizer_path=str(SP1024), iterations=4, warmup_steps=0,
                       val_loss_every=0, **knobs)
    sp, train_files, val_files = train_gpt.check_inputs(h)
    torch.manual_seed(h.seed)
    model, seen = train_gpt.GPT(h, sp.bos_id()), []
    forward = train_gpt.GPT.forward
    monkeypatch.setattr(train_gpt.GPT, "forward", lambda self, x, y, reduction="mean", segments=None, **kw: seen.append(
        (x.clone(), segments)) or forward(self, x, y, reduction, segments, **kw))
    train_gpt.train(h, CPU, model, train_gpt.TrainingData(train_files, h.vocab_size),
                    train_gpt.load_validation(h, sp, val_files, CPU.device), lambda line: None)
    stream = train_gpt.TokenStream(train_gpt.TrainingData(train_files, h.vocab_size)).take(32 * 257).astype(np.int64)
    return seen, stream


@pytest.mark.parametrize("packed", [False, True])
def test_the_model_trains_on_the_stream_in_rows_or_packed_documents(packed, short_val_shards, monkeypatch):
    """Each micro-batch is the next 256 stream tokens (+1 target). DOC_PACKING=0 with no schedule, on the default
    preset: 4 rows of TRAIN_SEQ_LEN=64, no segments. The defaults: one row whose segments start at 0 and at every
    BOS, none longer than the stage's length (16, 32, 32, 64 at the four steps), the cap being that length.
    Control: a packed row whose segments ignore the BOS positions is caught."""
    knobs = {} if packed else dict(doc_packing=False, train_seq_schedule="", seq_change_warmup_steps=0)
    seen, stream = _batches_seen(short_val_shards, monkeypatch, **knobs)
    assert len(seen) == 4 * 8
    caps = [16] * 8 + [32] * 16 + [64] * 8  # the derived 16@0.1,32@0.7,64@1: fractions 0, 0.25, 0.5, 0.75
    for k, (x, segments) in enumerate(seen):
        chunk = torch.from_numpy(stream[257 * k : 257 * k + 256])
        if not packed:
            assert segments is None and torch.equal(x, chunk.view(4, 64)), k
            continue
        cu, cap = segments
        bounds = sorted(set(cu.tolist()))
        assert torch.equal(x, chunk[None]) and cap == caps[k] and bounds[0] == 0 and bounds[-1] == 256, k
        assert set(np.flatnonzero(chunk.numpy() == BOS).tolist()) <= set(bounds), k
        assert max(np.diff(bounds)) <= cap, k
    if packed:
        monkeypatch.setattr(train_gpt, "cu_seqlens", lambda ids, bos, n: np.array([0, *range(n, len(ids), n), len(ids)],
                                                                               dtype=np.int32))
        seen, _ = _batches_seen(short_val_shards, monkeypatch)
        assert not all(set(np.flatnonzero(x[0].numpy() == BOS).tolist()) <= set(s[0].tolist()) for x, s in seen)


@pytest.mark.slow  # over 5 s on 2 CPU cores (two training runs)
def test_switches_ramp_the_lr_and_the_warmup_is_undone(short_val_shards, monkeypatch):
    """Packed, with a schedule: every stage's shapes are warmed up and everything restored (the same run as
    without warm-up); the switch is logged at the step where progress passes 0.4, and every optimizer step's LR
    multiplier is the base schedule times min(1, (step - s0 + 1) / W)."""
    scales, step_fn = [], train_gpt.Optimizers.step
    monkeypatch.setattr(train_gpt.Optimizers, "step", lambda self, s, *a: scales.append(s) or step_fn(self, s, *a))
    cold, cold_lines, w_cold = _train(short_val_shards, warmup_steps=0, **PACKED)
    cold_scales, scales[:] = scales[:], []
    warm, warm_lines, w_warm = _train(short_val_shards, warmup_steps=2, **PACKED)
    assert torch.equal(w_cold, w_warm) and cold.final.val_loss == warm.final.val_loss
    assert [l for l in warm_lines if l.startswith("warmup_shape")] == [
        "warmup_shape seq_len:32 cu_seqlens:64", "warmup_shape seq_len:32 cu_seqlens:128",
        "warmup_shape seq_len:32 cu_seqlens:192", "warmup_shape seq_len:32 cu_seqlens:256",
        "warmup_shape seq_len:64 cu_seqlens:64", "warmup_shape seq_len:64 cu_seqlens:128",
        "warmup_shape seq_len:64 cu_seqlens:192", "warmup_shape seq_len:64 cu_seqlens:256"]
    assert [l for l in cold_lines if l.startswith("seq_len_switch")] == ["seq_len_switch step:3 seq_len:64"]
    h = tiny_h(**PACKED)
    expected = [train_gpt.lr_scale(h, s, 0.0) * (min(1.0, (s - 3 + 1) / 2) if s >= 3 else 1.0) for s in range(5)]
    assert cold_scales == expected and expected[3] == train_gpt.lr_scale(h, 3, 0.0) / 2


def _train_rank(rank, world_size, shards):
    result, lines, weights = _train(shards, Dist(rank, world_size, 0, torch.device("cpu")), warmup_steps=1, **PACKED)
    losses = [float(re.search(r"train_loss:(\S+)", l)[1]) for l in lines if "train_loss" in l]
    return result.final.val_loss, losses, [l for l in lines if l.startswith("seq_len_switch")], weights


@pytest.mark.slow  # over 5 s on 2 CPU cores (two gloo ranks, then one)
def test_packed_schedule_on_two_ranks_equals_one_rank(short_val_shards):
    ranks = run_distributed(_train_rank, 2, short_val_shards)
    val_loss, losses, switches, weights = _train_rank(0, 1, short_val_shards)
    assert switches == ["seq_len_switch step:3 seq_len:64"] and len(losses) == 5
    for two in ranks:  # both ranks switch at the same step and hold the same weights as one rank
        assert two[2] == switches and torch.allclose(two[3], weights, rtol=1e-4, atol=1e-5)
        assert math.isclose(two[0], val_loss, rel_tol=1e-5)
        assert all(abs(a - b) <= 2e-4 for a, b in zip(two[1], losses, strict=True))
