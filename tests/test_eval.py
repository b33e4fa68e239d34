"""The evaluator: sliding windows that score every validation target exactly once with the context they
claim, legal score-first TTT (black-box legality, effect, 1 vs 2 ranks, every knob acts), the training-data
gate, and the time ledger."""

import math

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import SP1024, run_distributed, tiny_h

import train_gpt
from train_gpt import Dist

CPU = Dist(0, 1, 0, torch.device("cpu"))
SEQ = 64  # TINY_ENV's TRAIN_SEQ_LEN


def _luts():
    return train_gpt.build_byte_luts(spm.SentencePieceProcessor(model_file=str(SP1024)), 1024)


def _val(shards, n: int | None = None) -> train_gpt.ValidationData:
    tokens = train_gpt.load_data_shard(str(shards / "fineweb_val_000000.bin"))
    return train_gpt.make_validation(tokens[: n + 1] if n else tokens, _luts(), SEQ)


def _model(seed=0, **overrides):
    h = tiny_h(**overrides)
    torch.manual_seed(seed)
    return h, train_gpt.GPT(h)


def _trace(val):
    return torch.zeros(2, val.num_targets, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 4096])
@pytest.mark.parametrize("seq_len, stride", [(64, 64), (64, 16), (64, 24), (64, 1), (100, 7), (32, 32)])
def test_windows_score_each_target_once_with_the_context_they_claim(n, seq_len, stride):
    ends = train_gpt.window_ends(n, seq_len, stride)
    starts = np.concatenate(([0], ends[:-1]))
    assert ends[-1] == n and np.all(ends > starts)  # consecutive, non-empty: each target exactly once
    L = min(seq_len, n)
    assert np.all(ends[1:] - starts[1:] <= stride) and np.all(ends >= L)  # every window reads L inputs
    # a target at i in the window ending at e sees the inputs e-L .. i: at least L - stride + 1 of them
    assert np.all(starts[1:] - (ends[1:] - L) + 1 >= L - stride + 1)
    if stride == seq_len and n % seq_len == 0:
        assert np.array_equal(ends, np.arange(seq_len, n + 1, seq_len))  # the plain evaluator's sequences


def test_stride_equal_to_the_window_is_the_plain_evaluator(sample_shards):
    h, model = _model()
    val = _val(sample_shards)
    model.eval()
    with torch.no_grad():  # the plain evaluator written out: consecutive sequences, float64 sums
        t = torch.from_numpy(val.tokens.astype(np.int64))
        x, y = t[:-1].view(-1, SEQ), t[1:].view(-1, SEQ)
        loss = sum(model(x[i : i + 7], y[i : i + 7], reduction="none").double().sum() for i in range(0, len(x), 7))
    r = train_gpt.evaluate(h, CPU, model, val, train_gpt.Windows(SEQ, SEQ, 5))
    assert r.tokens == val.num_targets and r.bytes == val.byte_count
    assert math.isclose(r.val_loss, float(loss) / val.num_targets, rel_tol=1e-12)
    plain = train_gpt.eval_val(h, CPU, model, val)
    assert math.isclose(plain.val_loss, r.val_loss, rel_tol=1e-12) and plain.bytes == r.bytes


def test_each_scored_loss_is_the_model_on_its_window(sample_shards):
    """Sliding scores are aligned: target i's loss is the model's at i's position in its window."""
    h, model = _model()
    val, trace = _val(sample_shards, 700), None
    trace = _trace(val)
    r = train_gpt.evaluate(h, CPU, model, val, train_gpt.Windows(SEQ, 24, 3), trace=trace)
    assert torch.equal(trace[0], torch.ones(val.num_targets)) and r.bytes == val.byte_count
    ends = train_gpt.window_ends(val.num_targets, SEQ, 24)
    model.eval()
    t = torch.from_numpy(val.tokens.astype(np.int64))
    for k in (0, 1, 5, len(ends) - 2, len(ends) - 1):
        e = int(ends[k])
        with torch.no_grad():
            losses = model(t[e - SEQ : e][None], t[e - SEQ + 1 : e + 1][None], reduction="none")[0]
        first = int(ends[k - 1]) if k else 0
        torch.testing.assert_close(trace[1][first:e], losses[SEQ - (e - first) :].double(), rtol=1e-6, atol=1e-6)
    assert math.isclose(r.val_loss, float(trace[1].sum()) / val.num_targets, rel_tol=1e-12)


def _sliding_rank(rank, world_size, shards, stride, batch):
    d = Dist(rank, world_size, 0, torch.device("cpu"))
    h, model = _model()
    val = _val(shards, 6000)
    trace = _trace(val)
    r = train_gpt.evaluate(h, d, model, val, train_gpt.Windows(SEQ, stride, batch), trace=trace)
    return r, trace, val.num_targets, val.byte_count


@pytest.mark.slow  # over 5 s on 2 CPU cores (two gloo ranks)
def test_sliding_scores_every_token_once_on_one_and_two_ranks(sample_shards):
    r1, trace1, n, nbytes = _sliding_rank(0, 1, sample_shards, 16, 32)
    assert torch.equal(trace1[0], torch.ones(n)) and (r1.tokens, r1.bytes) == (n, nbytes)
    for r2, trace2, _, _ in run_distributed(_sliding_rank, 2, sample_shards, 16, 5):  # other batch: padding
        assert torch.equal(trace2[0], torch.ones(n)) and (r2.tokens, r2.bytes) == (n, nbytes)
        torch.testing.assert_close(trace2[1], trace1[1], rtol=1e-5, atol=1e-5)
        assert math.isclose(r2.val_loss, r1.val_loss, rel_tol=1e-6)


def test_an_evaluation_that_misses_targets_or_bytes_fails_naming_the_counts(sample_shards, monkeypatch):
    """Every evaluator goes through evaluate, which checks its sums against val_data's tokens and bytes."""
    val = _val(sample_shards, 1000)
    h, model = _model()
    expected = f"but val_data has tokens:{val.num_targets} bytes:{val.byte_count}"
    window_ends = train_gpt.window_ends
    ends = window_ends(val.num_targets, SEQ, 32)
    monkeypatch.setattr(train_gpt, "window_ends", lambda n, L, stride: window_ends(n, L, stride)[:-1])
    with pytest.raises(RuntimeError, match=rf"^sliding_window evaluation \(seq_len:64 stride:32\) scored "
                                           rf"{ends[-2]} tokens and \d+ bytes, {expected}"):
        train_gpt.evaluate(h, CPU, model, val, train_gpt.Windows(SEQ, 32, 4))
    monkeypatch.undo()
    wrong = train_gpt.ValidationData(val.tokens, val.luts, val.seq_len, val.byte_count + 1)
    with pytest.raises(RuntimeError, match=rf"^plain evaluation \(seq_len:64 stride:64\) scored {val.num_targets} "
                                           rf"tokens and {val.byte_count} bytes, but val_data has "
                                           rf"tokens:{val.num_targets} bytes:{val.byte_count + 1}"):
        train_gpt.eval_val(h, CPU, model, wrong)
    with pytest.raises(RuntimeError, match=r"^legal_ttt evaluation \(seq_len:64 stride:32\) scored"):
        _ttt_eval(wrong)
    r = train_gpt.eval_val(h, CPU, model, val)
    assert (r.tokens, r.bytes) == (val.num_targets, val.byte_count)


# ---- legal score-first TTT ---------------------------------------------------------------------------------

TTT = dict(ttt_enabled=True, ttt_mode="chunks", ttt_chunk_tokens=512, ttt_lr=0.05, ttt_epochs=2, ttt_batch_seqs=4)


def _ttt_eval(val, seed=0, stride=32, trace=None, d=CPU, **overrides):
    h, model = _model(seed, **{**TTT, **overrides})
    ttt = train_gpt.ScoreFirstTTT(h, d, model, model)
    return train_gpt.evaluate(h, d, model, val, train_gpt.Windows(SEQ, stride, 4), ttt=ttt, trace=trace), model


def test_ttt_scores_of_a_chunk_do_not_depend_on_later_tokens(sample_shards):
    """Black-box legality: change every token after chunk k; the scores of chunks 0..k stay bit-identical."""
    val = _val(sample_shards, 4096)
    k, C = 3, TTT["ttt_chunk_tokens"]
    changed = val.tokens.copy()
    cut = (k + 1) * C + 1  # token cut is the target of position (k+1)C: the first of chunk k+1
    changed[cut:] = np.random.default_rng(0).integers(2, 1024, len(changed) - cut)
    other = train_gpt.make_validation(changed, val.luts, SEQ)
    a, b = _trace(val), _trace(val)
    _ttt_eval(val, trace=a)
    _ttt_eval(other, trace=b)
    assert torch.equal(a[:, : cut - 1], b[:, : cut - 1])
    assert not torch.equal(a[1, cut - 1 :], b[1, cut - 1 :])
    assert torch.equal(a[0], torch.ones(val.num_targets))  # and TTT scores every target once, too


def test_ttt_lowers_the_loss_on_a_repetitive_stream():
    rng = np.random.default_rng(1)
    pattern = np.concatenate(([1], rng.integers(2, 1024, 150)))  # BOS + 150 random tokens, repeated
    val = train_gpt.make_validation(np.tile(pattern, 28).astype(np.uint16), _luts(), SEQ)
    h, model = _model()
    plain = train_gpt.evaluate(h, CPU, model, val, train_gpt.Windows(SEQ, 32, 4))
    adapted, _ = _ttt_eval(val)
    assert adapted.tokens == plain.tokens and adapted.bytes == plain.bytes
    assert adapted.val_loss < plain.val_loss - 1.0, (adapted.val_loss, plain.val_loss)


def _ttt_rank(rank, world_size, shards):
    d = Dist(rank, world_size, 0, torch.device("cpu"))
    r, model = _ttt_eval(_val(shards, 2500), d=d, ttt_batch_seqs=3)  # 3 sequences over 2 ranks: uneven
    return r, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.slow  # over 5 s on 2 CPU cores (two gloo ranks)
def test_two_rank_ttt_matches_one_rank(sample_shards):
    r1, w1 = _ttt_rank(0, 1, sample_shards)
    (ra, wa), (rb, wb) = run_distributed(_ttt_rank, 2, sample_shards)
    assert torch.equal(wa, wb)  # every rank keeps identical weights
    torch.testing.assert_close(wa, w1, rtol=1e-4, atol=1e-5)
    for r in (ra, rb):
        assert (r.tokens, r.bytes) == (r1.tokens, r1.bytes) and math.isclose(r.val_loss, r1.val_loss, rel_tol=1e-5)


def test_every_ttt_knob_changes_the_result(sample_shards):
    """Every knob changes the score; three also by their defining property on how far TTT moves the weights from
    the model it started from: a lower TTT_LR and a tight TTT_GRAD_CLIP move them less, TTT_FREEZE_BLOCKS=1 keeps
    block 0 exactly and still moves the rest."""
    val = _val(sample_shards, 2048)
    start = _model(0, **TTT)[1]
    base, model = _ttt_eval(val)

    def moved(m, prefix=""):
        return sum((p.detach() - q.detach()).norm() ** 2 for (n, p), q in zip(m.named_parameters(), start.parameters())
                   if n.startswith(prefix)) ** 0.5

    for knob, value in dict(ttt_optimizer="adamw", ttt_lr=0.02, ttt_momentum=0.5, ttt_epochs=1,
                            ttt_chunk_tokens=1024, ttt_freeze_blocks=1, ttt_batch_seqs=2,
                            ttt_grad_clip=0.01).items():
        r, m = _ttt_eval(val, **{knob: value})
        assert r.val_loss != base.val_loss, knob
        assert (r.tokens, r.bytes) == (base.tokens, base.bytes)
        if knob in ("ttt_lr", "ttt_grad_clip"):
            assert moved(m) < moved(model), knob
        if knob == "ttt_freeze_blocks":
            assert moved(m, "blocks.0.") == 0 and moved(m, "blocks.1.") > 0 and moved(model, "blocks.0.") > 0


def test_frozen_blocks_keep_their_weights(sample_shards):
    _, before = _model()
    _, after = _ttt_eval(_val(sample_shards, 2048), ttt_freeze_blocks=1)
    same = {n for n, p in after.named_parameters() if torch.equal(p, dict(before.named_parameters())[n])}
    assert {n for n, _ in after.blocks[0].named_parameters(prefix="blocks.0")} <= same
    assert not any(n.startswith("blocks.1.") and n.endswith(".weight") for n in same)  # (scalars: tiny grads)
    assert "tok_emb.weight" not in same


# ---- the rules by construction ------------------------------------------------------------------------------


def test_training_data_cannot_be_read_after_the_clock_stops(sample_shards):
    data = train_gpt.TrainingData(sorted(map(str, sample_shards.glob("fineweb_train_*.bin"))), 1024)
    loader = train_gpt.DistributedTokenLoader(data, 0, 1)
    loader.next_batch(256, SEQ, CPU.device)
    loader.pending[1].result()  # the prefetch of the next batch, read before the clock stops
    assert data.tokens_read == 2 * 257
    data.close()
    with pytest.raises(RuntimeError, match="training data read after the training clock stopped"):
        loader.next_batch(256, SEQ, CPU.device)
    with pytest.raises(RuntimeError, match="fineweb_train_000000.bin: training data read after"):
        train_gpt.DistributedTokenLoader(data, 0, 1)
    h = tiny_h(gptq_calib_tokens=1024)
    with pytest.raises(RuntimeError, match="after the training clock stopped"):
        list(train_gpt.training_batches(h, CPU, loader, None))


@pytest.mark.slow  # over 5 s on 2 CPU cores (two training runs)
def test_periodic_validation_does_not_touch_the_weights(short_val_shards):
    runs = []
    for every in (1, 0):  # validate after every step, or only at the end
        h = tiny_h(data_path=str(short_val_shards), tokenizer_path=str(SP1024), val_loss_every=every)
        sp, train_files, val_files = train_gpt.check_inputs(h)
        torch.manual_seed(h.seed)
        model = train_gpt.GPT(h)
        val = train_gpt.load_validation(h, sp, val_files, CPU.device)
        result = train_gpt.train(h, CPU, model, train_gpt.TrainingData(train_files, 1024), val, lambda m: None)
        runs.append((model.state_dict(), result.averager.shadow))
    (sd_a, ema_a), (sd_b, ema_b) = runs
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert all(torch.equal(a, b) for a, b in zip(ema_a, ema_b))


def test_time_ledger_totals_and_the_over_budget_line():
    lines = []
    ledger = train_gpt.TimeLedger(CPU, lines.append)
    ledger.add("train_loop", "train", 590_000)
    ledger.add("compile_warmup", None, 90_000)
    with ledger.phase("quick", "eval") as t:
        pass
    ledger.add("ttt_eval", "eval", 600_000)
    ledger.summary()
    assert lines[0] == "time_ledger phase:train_loop ms:590000 charged_to:train"
    assert lines[1] == "time_ledger phase:compile_warmup ms:90000 charged_to:none"
    assert lines[2].startswith("time_ledger phase:quick ms:") and t.ms >= 0
    assert lines[-2] == (f"time_ledger train:590000ms eval:{600_000 + t.ms:.0f}ms not_charged:90000ms "
                         "budget_each:600000ms")
    assert lines[-1].startswith("time_ledger OVER_BUDGET: evaluation took 600.0s, more than the 600s")
    assert not any("training took" in l for l in lines)


def test_forward_flops_match_torch_flop_counter():
    """The matmul FLOPs the log and the benchmark use are what torch counts on a real forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    for overrides in ({}, dict(bigram_vocab_size=0, ve_layers="", tie_embeddings=False, mlp_mult=2.0)):
        h, model = _model(**overrides)
        with FlopCounterMode(display=False) as counter:
            model.forward_logits(torch.randint(0, 1024, (2, SEQ)))
        matmul, attention = train_gpt.forward_flops_per_token(h, SEQ)
        assert counter.get_total_flops() == matmul * 2 * SEQ  # (SDPA on CPU is not counted by torch)
        hd = h.model_dim // h.num_heads  # causal: position t attends to t + 1 positions
        assert attention == h.num_layers * 4 * h.num_heads * hd * sum(range(1, SEQ + 1)) / SEQ
