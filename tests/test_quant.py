"""The export pipeline: the quantization path (RTN, GPTQ-lite, GPTQ), the storage policy, pruning to the byte
cap, compression and the checksummed artifact, weight averaging and late QAT."""

import dataclasses
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import SEED_STACK_ENV, run_distributed, tiny_h
from torch._dynamo.utils import counters
from helpers import CPU, randomized
from helpers import quant_h as _h
from helpers import quant_state as _state

import train_gpt
from train_gpt import GPT


# ---- the quantization path -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
def test_round_to_nearest_error_is_at_most_half_a_step(bits):
    torch.manual_seed(bits)
    w = torch.randn(48, 200) * torch.logspace(-4, 1, 48)[:, None]  # rows of very different scales
    w[5] = 0.0  # an all-zero row
    q, s = train_gpt.quantize_rows(w, bits, clips=(1.0,))
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and q.abs().max() == qmax
    err = (w - q.float() * s.float()[:, None]).abs()
    assert (err <= s.float()[:, None] / 2).all()  # scales round up to fp16: nothing inside the clip is clamped
    assert not q[5].any()


def test_clip_search_is_never_worse_than_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(64, 256) ** 3  # heavy tails: clipping the outliers pays off
    rtn = train_gpt.quantize_rows(w, 5, clips=(1.0,))
    lite = train_gpt.quantize_rows(w, 5)
    row_err = lambda qs: (w - qs[0].float() * qs[1].float()[:, None]).square().sum(1)  # noqa: E731
    assert (row_err(lite) <= row_err(rtn) + 1e-6).all() and row_err(lite).sum() < row_err(rtn).sum()


def test_sdclip_clips_each_row_at_k_standard_deviations():
    """SDClip (PR #1394): row i's clip is k * std(w_i): scale = that / qmax rounded up to fp16, values past it
    clamp to +-qmax, and a wider k gives fewer bytes (lower symbol entropy), the rule's monotonicity."""
    torch.manual_seed(0)
    w = torch.randn(32, 512) * torch.logspace(-2, 0, 32)[:, None]
    sizes = []
    for k in (3.0, 6.0, 12.85):
        q, s = train_gpt.quantize_rows(w, 6, clip=train_gpt.sdclip(w, k))
        assert torch.equal(s, train_gpt.row_scale(k * w.std(dim=1), 31))
        inside = w.abs() <= k * w.std(dim=1, keepdim=True)
        err, step = (w - q * s.float()[:, None]).abs(), s.float()[:, None].expand_as(w)
        assert (q[~inside].abs() == 31).all() and (err[inside] <= step[inside] / 2).all()
        sizes.append(train_gpt.entropy_bytes(q))
    assert sizes[0] > sizes[1] > sizes[2]


def test_hessian_aware_sdclip_widens_the_rows_on_important_inputs():
    """PR #1412: clip_i * (1 + lam (r_i - 1)), r_i = mean_j |w_ij| diag(H)_j / mean(diag H), normalised to mean 1;
    lam = 0 (or no H) is plain SDClip."""
    torch.manual_seed(0)
    w = torch.randn(4, 8)
    w[0, :2] = 5.0  # row 0 is large on the inputs that matter
    H = torch.diag(torch.tensor([10.0, 10.0, 1, 1, 1, 1, 1, 1]))
    plain, aware = train_gpt.sdclip(w, 12.0), train_gpt.sdclip(w, 12.0, H, 0.175)
    assert torch.equal(train_gpt.sdclip(w, 12.0, H, 0.0), plain)
    assert torch.equal(train_gpt.sdclip(w, 12.0, None, 0.175), plain)
    r = (w.abs() * (H.diagonal() / H.diagonal().mean())).mean(1)
    assert torch.allclose(aware, plain * (1 + 0.175 * (r / r.mean() - 1))) and aware[0] > plain[0]


def test_sdclip_takes_k_by_tensor_group_and_off_is_the_clip_search():
    h = _h(quant_method="rtn", quant_clip="sdclip", quant_sigmas_mlp=5.0, quant_sigmas_attn=7.0,
           quant_sigmas_embed=9.0)
    _, sd, kinds = _state(h)
    out, _ = train_gpt.quantize_state(h, sd, kinds)
    for name, k in (("blocks.0.mlp.fc.weight", 5.0), ("blocks.1.attn.c_q.weight", 7.0), ("tok_emb.weight", 9.0)):
        bits = train_gpt.quant_bits(h, name, kinds[name], sd[name].shape)
        clip = k * sd[name].float().std(dim=1)
        assert torch.equal(out[name + ".scale"], train_gpt.row_scale(clip, 2 ** (bits - 1) - 1))
    search, _ = train_gpt.quantize_state(_h(quant_method="rtn"), sd, kinds)
    rtn = train_gpt.quantize_rows(sd["tok_emb.weight"], 8, clips=(1.0,))
    assert torch.equal(search["tok_emb.weight.scale"], rtn[1])
    for env, message in (({"QUANT_SIGMAS_MLP": "10"}, "QUANT_SIGMAS_MLP=10.0: has no effect unless QUANT_CLIP=sdclip"),
                         ({"QUANT_CLIP": "search", "QUANT_METHOD": "gptq_lite"},
                          "QUANT_CLIP='search': has no effect unless QUANT_METHOD!=gptq_lite"),
                         ({"QUANT_CLIP": "sdclip", "QUANT_METHOD": "rtn", "QUANT_SDCLIP_LAMBDA": "0.1"},
                          "QUANT_SDCLIP_LAMBDA=0.1: has no effect unless QUANT_CLIP=sdclip and QUANT_METHOD=gptq")):
        with pytest.raises(train_gpt.ConfigError, match=message):
            train_gpt.Hyperparameters.from_env({**SEED_STACK_ENV, **env})


def _nextafter_row_scale(clip, qmax):
    """The eager definition: round to fp16, then one fp16 step up where that fell below clip / qmax."""
    s = (clip.float() / qmax).clamp_min(2.0**-24)
    s16 = s.half()
    return torch.where(s16.float() < s, torch.nextafter(s16, torch.full_like(s16, math.inf)), s16)


def _clips():
    """Clip values over the whole fp16 scale range: random, log-spread down to the subnormals, and every finite
    fp16 (times qmax) exactly, one fp32 step above and one below."""
    g = torch.Generator().manual_seed(0)
    every = torch.arange(0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    up, down = torch.tensor(math.inf), torch.tensor(0.0)
    return lambda qmax: torch.cat([torch.rand(20000, generator=g) * 3, torch.exp(torch.randn(20000, generator=g) * 6),
                                   torch.tensor([0.0, 1e-30]), every * qmax, torch.nextafter(every * qmax, up),
                                   torch.nextafter(every * qmax, down)])


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_row_scale_is_the_smallest_fp16_at_or_above_clip_over_qmax(bits):
    qmax, clips = 2 ** (bits - 1) - 1, _clips()
    clip = clips(qmax)
    s = train_gpt.row_scale(clip, qmax)
    assert s.dtype == torch.float16 and torch.equal(s, _nextafter_row_scale(clip, qmax))
    target = (clip / qmax).clamp_min(2.0**-24)
    below = torch.nextafter(s, torch.zeros_like(s)).float()
    assert (s.float() >= target).all() and ((below < target) | (s == 2.0**-24)).all()


def test_row_scale_and_fake_quantize_compile_bit_exactly():
    """Inductor computes the QAT grid of eager, also on the rows where a plain fp16 cast rounds the scale down
    (about half of them: the compiled compare `s16.float() < s` of rounding-then-stepping is always false)."""
    torch._dynamo.reset()
    counters.clear()
    clip = _clips()(31)
    s = (clip / 31).clamp_min(2.0**-24)
    assert (s.half().float() < s).sum() > len(clip) // 4  # rows where the round-up matters
    compiled = torch.compile(train_gpt.row_scale, backend="inductor", dynamic=False, fullgraph=True)
    assert torch.equal(compiled(clip, 31), train_gpt.row_scale(clip, 31))
    torch.manual_seed(0)
    w = torch.randn(256, 64) * torch.logspace(-5, 1, 256)[:, None]
    fq = torch.compile(train_gpt.fake_quantize, backend="inductor", dynamic=False, fullgraph=True)
    for bits in (4, 6):
        assert torch.equal(fq(w, bits), train_gpt.fake_quantize(w, bits))
    assert counters["stats"]["unique_graphs"] >= 3


@pytest.fixture(scope="module")
def real_hessians(sample_shards):
    """Hessians of a tiny model's block matrices from hooks on real text."""
    torch.manual_seed(0)
    h = _h(num_layers=2, ve_layers="1")
    model = randomized(GPT(h))
    tokens = train_gpt.load_data_shard(str(sample_shards / "fineweb_train_000000.bin"))[: 8 * 128 + 1]
    x = torch.from_numpy(tokens[:-1].astype(np.int64)).view(8, 128)
    hessians, n = train_gpt.collect_hessians(model, [x], CPU)
    assert n == 8 * 128 and set(hessians) == {n for n, _ in train_gpt.param_groups(model)["matrix"]}
    return model, hessians


@pytest.mark.parametrize("bits", [4, 6])
def test_gptq_output_error_is_below_round_to_nearest_on_real_activations(real_hessians, bits):
    model, hessians = real_hessians
    for name in ("blocks.0.attn.c_q.weight", "blocks.1.mlp.fc.weight", "blocks.1.mlp.proj.weight"):
        w, H = model.get_parameter(name).detach(), hessians[name]
        out_err = lambda qs: torch.trace((w - qs[0].float() * qs[1].float()[:, None]) @ H  # noqa: E731
                                         @ (w - qs[0].float() * qs[1].float()[:, None]).T).item()
        rtn = out_err(train_gpt.quantize_rows(w, bits, clips=(1.0,)))
        gptq = out_err(train_gpt.quantize_rows(w, bits, H, clips=(1.0,)))
        full = out_err(train_gpt.quantize_rows(w, bits, H))
        assert gptq < 0.9 * rtn and full <= gptq * (1 + 1e-6), name


def test_pruned_entries_stay_zero_through_gptq(real_hessians):
    model, hessians = real_hessians
    name = "blocks.0.mlp.fc.weight"
    w = model.get_parameter(name).detach()
    keep = w.abs() > w.abs().median()
    q, _ = train_gpt.quantize_rows(w, 6, hessians[name], keep=keep)
    assert not q[~keep].any() and q[keep].any()


def test_storage_policy():
    h = _h(fp16_max_numel=10_000, quant_mlp_bits=5, quant_attn_bits=7, quant_embed_bits=8, tie_embeddings=False)
    _, sd, kinds = _state(h)
    bits = {n: train_gpt.quant_bits(h, n, kinds[n], t.shape) for n, t in sd.items()}
    assert bits["blocks.0.mlp.fc.weight"] == 5 and bits["blocks.1.mlp.proj.weight"] == 5
    assert bits["blocks.0.attn.c_q.weight"] == 7 and bits["blocks.0.attn.c_k.weight"] == 16  # 64 x 128 is small
    assert bits["tok_emb.weight"] == bits["lm_head.weight"] == 8 and bits["bigram.embed.weight"] == 16
    assert all(bits[n] == 16 for n in sd if kinds[n] == "scalar")  # control tensors, gates, projections
    tensors, meta = train_gpt.quantize_state(h, sd, kinds)
    assert tensors["blocks.0.mlp.fc.weight.q"].abs().max() <= 15 and tensors["skip_weights"].dtype == torch.float16


def test_magnitude_pruning_zeroes_the_smallest_weights():
    h = _h(fp16_max_numel=1024, prune_frac=0.25, quant_method="gptq_lite")
    _, sd, kinds = _state(h)
    tensors, _ = train_gpt.quantize_state(h, sd, kinds)
    w, q = sd["blocks.0.mlp.fc.weight"], tensors["blocks.0.mlp.fc.weight.q"]
    small = w.abs() <= w.abs().flatten().kthvalue(int(0.25 * w.numel())).values
    assert not q[small].any()


# ---- artifact: round trip, determinism, damage ----------------------------------------------------------


@pytest.mark.parametrize("compressor", [pytest.param(c, marks=[pytest.mark.slow, pytest.mark.skipif(
    not shutil.which("lrzip"), reason="needs the lrzip binary")] if c == "pergroup" else [])
    for c in train_gpt.COMPRESSORS])
def test_round_trip_is_bit_exact_and_deterministic(compressor, tmp_path):
    h = _h(compressor=compressor)
    _, sd, kinds = _state(h)
    tensors, meta = train_gpt.quantize_state(h, sd, kinds)
    blob = train_gpt.encode_artifact(tensors, meta, compressor)
    assert train_gpt.encode_artifact(*train_gpt.quantize_state(h, sd, kinds), compressor) == blob
    path = tmp_path / "final_model.ptz"
    train_gpt.write_atomic(str(path), blob)
    loaded = train_gpt.decode_artifact(path.read_bytes(), h, str(path))
    expected = train_gpt.dequantize_state(tensors, meta)
    assert loaded.keys() == sd.keys()
    for name, t in loaded.items():
        assert t.dtype == sd[name].dtype and torch.equal(t, expected[name])
    GPT(h).load_state_dict(loaded, strict=True)
    assert not list(tmp_path.glob("*.tmp*"))


def test_damaged_or_foreign_artifacts_are_clear_errors():
    h = _h()
    _, sd, kinds = _state(h)
    blob = train_gpt.encode_artifact(*train_gpt.quantize_state(h, sd, kinds), "zstd")
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    for bad, message in ((b"PK\x03\x04" + blob[4:], "not a train_gpt.py artifact"),
                         (blob[:-10], "checksum mismatch"), (bytes(flipped), "checksum mismatch"),
                         (blob[:5] + bytes([1]) + blob[6:], "artifact format 1"), (blob[:20], "not a train_gpt")):
        with pytest.raises(ValueError, match=f"^x.ptz: {message}"):
            train_gpt.decode_artifact(bad, h, "x.ptz")
    with pytest.raises(ValueError, match=r"^x.ptz: made with another model configuration: MLP_ACT='leaky_relu2' "
                                         r"\(this run: 'relu2'\)"):
        train_gpt.decode_artifact(blob, _h(mlp_act="relu2"), "x.ptz")


def test_loading_never_unpickles(monkeypatch):
    h = _h()
    _, sd, kinds = _state(h)
    blob = train_gpt.encode_artifact(*train_gpt.quantize_state(h, sd, kinds), "lzma")

    def refuse(*a, **k):
        raise AssertionError("artifact loading must not unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert train_gpt.decode_artifact(blob, h, "x").keys() == sd.keys()


def test_container_rejects_damage():
    t = {"a": torch.arange(6, dtype=torch.int16).view(2, 3), "b": torch.ones(0), "c": torch.tensor([True, False])}
    raw = train_gpt.pack_tensors(t, {"k": 1})
    out, meta = train_gpt.unpack_tensors(raw)
    assert meta == {"k": 1} and all(torch.equal(out[k], t[k]) for k in t)
    for bad, message in ((b"PICKLE" + raw, "bad magic"), (raw[:-1], "truncated"), (raw + b"\0", "trailing")):
        with pytest.raises(ValueError, match=message):
            train_gpt.unpack_tensors(bad)


# ---- selective pruning to the byte target ---------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized():
    h = _h(fp16_max_numel=1024, quant_mlp_bits=5, quant_attn_bits=5, compressor="zstd")
    _, sd, kinds = _state(h)
    tensors, meta = train_gpt.quantize_state(h, sd, kinds)
    return h, tensors, meta


@pytest.mark.slow  # over 5 s on 2 CPU cores (many quantize-compress rounds)
def test_selective_pruning_reaches_the_target_and_never_exceeds_it(quantized):
    h, tensors, meta = quantized
    full = len(train_gpt.encode_artifact(tensors, meta, h.compressor))
    lines = []
    train_gpt.prune_to_fit(h, tensors, meta, None, 0, lines.append)
    floor = int(lines[0].rsplit("full_prune:", 1)[1].rstrip("B"))  # the size with every +-1 value zeroed
    assert floor < full - 1000
    for target in (full - 500, (full + floor) // 2, floor + 50):
        blob = train_gpt.prune_to_fit(h, tensors, meta, None, target, lines.append)
        assert len(blob) <= target
        pruned = train_gpt.unpack_tensors(train_gpt.decompress(blob[39:], "zstd"))[0]
        changed = 0
        for name, t in tensors.items():
            diff = pruned[name] != t
            assert (t[diff].abs() == 1).all() and not pruned[name][diff].any()  # only +-1 values became 0
            changed += int(diff.sum())
        assert 0 < changed and f"zeroed {changed}/" in lines[-1]
    assert train_gpt.prune_to_fit(h, tensors, meta, None, full, lines.append) == \
        train_gpt.encode_artifact(tensors, meta, h.compressor)  # already fits: untouched


def test_selective_pruning_prunes_the_cheapest_values_first(quantized):
    h, tensors, meta = quantized
    full = len(train_gpt.encode_artifact(tensors, meta, h.compressor))
    blob = train_gpt.prune_to_fit(h, tensors, meta, None, full - 600, lambda m: None)
    pruned = train_gpt.unpack_tensors(train_gpt.decompress(blob[39:], "zstd"))[0]
    costs_pruned, costs_kept = [], []
    for name, info in meta["tensors"].items():
        if 0 < info["bits"] < 16:
            q, s = tensors[name + ".q"], tensors[name + ".scale"].float()
            cost = (s[:, None] ** 2).expand_as(q)
            ones = q.abs() == 1
            costs_pruned.append(cost[ones & (pruned[name + ".q"] == 0)])
            costs_kept.append(cost[ones & (pruned[name + ".q"] != 0)])
    assert torch.cat(costs_pruned).max() <= torch.cat(costs_kept).min()


def test_unreachable_target_prunes_everything_and_says_so(quantized):
    """Every +-1 value of every int-N tensor becomes 0 and nothing else changes: the artifact is the tensors with
    exactly that many zeros more (decoded back), still over the target, and the log says so."""
    h, tensors, meta = quantized
    lines = []
    blob = train_gpt.prune_to_fit(h, tensors, meta, None, 100, lines.append)
    pruned = train_gpt.unpack_tensors(train_gpt.decompress(blob[39:], "zstd"))[0]
    ones = 0
    for name, info in meta["tensors"].items():
        if 0 < info["bits"] < 16:
            q = tensors[name + ".q"]
            assert torch.equal(pruned[name + ".q"], torch.where(q.abs() == 1, torch.zeros_like(q), q)), name
            ones += int((q.abs() == 1).sum())
    assert ones > 1000 and f"{ones} +-1 candidates" in lines[0]
    assert len(blob) > 100 and "does not reach the target" in lines[-1]


# ---- weight averaging ------------------------------------------------------------------------------------


def test_ema_arithmetic_with_and_without_warmup():
    p = [torch.nn.Parameter(torch.zeros(3))]
    fixed, warm = train_gpt.EMA(p, 0.9, warmup=False), train_gpt.EMA(p, 0.9, warmup=True)
    expected_fixed, expected_warm = torch.zeros(3), torch.zeros(3)
    for n in range(200):
        with torch.no_grad():
            p[0].fill_(float(n))
        d = min(0.9, (1 + n) / (10 + n))
        expected_fixed = 0.9 * expected_fixed + 0.1 * n
        expected_warm = d * expected_warm + (1 - d) * n
        fixed.step(p, n + 1, 1.0)
        warm.step(p, n + 1, 1.0)
    torch.testing.assert_close(fixed.shadow[0], expected_fixed.expand(3))
    torch.testing.assert_close(warm.shadow[0], expected_warm.expand(3))
    assert [train_gpt.EMA(p, 0.997, True).current_decay()] == [0.1]  # the first update mostly copies
    late = train_gpt.EMA(p, 0.997, True)
    late.updates = 2990
    assert late.current_decay() == 0.997  # the records' decay from here on


def test_ema_warmup_forgets_the_initial_weights_in_a_short_run():
    """The records' failure mode: 300 steps into a run, a fixed 0.997 still gives the initial weights
    0.997^300 = 41% of the average; with the warm-up their share is negligible."""
    p = [torch.nn.Parameter(torch.full((1,), 100.0))]  # the initial weights: 100
    fixed, warm = train_gpt.EMA(p, 0.997, False), train_gpt.EMA(p, 0.997, True)
    with torch.no_grad():
        p[0].zero_()  # every trained weight: 0
    for n in range(300):
        fixed.step(p, n + 1, 1.0)
        warm.step(p, n + 1, 1.0)
    assert fixed.shadow[0].item() == pytest.approx(100 * 0.997**300) and warm.shadow[0].item() < 1e-6


def test_swa_averages_the_snapshots_of_the_warmdown_tail():
    p = [torch.nn.Parameter(torch.zeros(2))]
    lines = []
    swa = train_gpt.SWA(every=5, start_frac=0.5, log=lines.append)
    assert swa.averaged()[0] is None
    for step in range(1, 41):
        with torch.no_grad():
            p[0].fill_(float(step))
        swa.step(p, step, scale=1 - step / 40)  # scale < 0.5 from step 21
    weights, what = swa.averaged()
    torch.testing.assert_close(weights[0], torch.full((2,), (25 + 30 + 35 + 40) / 4))
    assert what.startswith("swa checkpoints:4") and lines == ["swa:start step:25"]
    model = torch.nn.Linear(2, 1)
    assert train_gpt.apply_average(model, None).startswith("none")


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_warmup_knob_sets_the_decay_schedule(warmup):
    """EMA_WARMUP reaches the averager: decay min(EMA_DECAY, (1 + n) / (10 + n)) after n updates, or EMA_DECAY
    from the first update."""
    model = GPT(tiny_h(num_layers=1, ve_layers=""))
    ema = train_gpt.make_averager(tiny_h(ema_warmup=warmup, ema_decay=0.95), model, print)
    for n in range(300):
        assert ema.current_decay() == pytest.approx(min(0.95, (1 + n) / (10 + n)) if warmup else 0.95), n
        ema.updates += 1


def test_swa_every_and_start_frac_pick_the_snapshot_steps():
    """A snapshot after step s exactly when s % SWA_EVERY == 0 and the LR scale that step trained at is below
    SWA_START_FRAC (strictly)."""
    h = tiny_h(weight_averaging="swa", swa_every=3, swa_start_frac=0.5)
    p = [torch.nn.Parameter(torch.zeros(1))]
    swa = train_gpt.make_averager(h, torch.nn.Linear(1, 1), lambda m: None)
    assert (swa.every, swa.start_frac) == (3, 0.5)
    swa = train_gpt.SWA(3, 0.5, lambda m: None)
    taken = []
    for step in range(1, 31):
        with torch.no_grad():
            p[0].fill_(float(step))
        scale = 1 - step / 30 if step != 21 else 0.5  # exactly the threshold at step 21: not below it
        before = swa.count
        swa.step(p, step, scale)
        taken += [step] if swa.count > before else []
    assert taken == [18, 24, 27, 30]
    assert swa.averaged()[0][0].item() == pytest.approx(sum(taken) / 4)


def test_swa_through_train_exports_the_mean_of_its_snapshots(short_val_shards, monkeypatch):
    """WEIGHT_AVERAGING=swa in train(): the weights loaded for export (finish_training's apply_average) are the
    mean of the weights after the steps whose index is a multiple of SWA_EVERY and whose LR scale is below
    SWA_START_FRAC, both recorded from the run. Control: an SWA that snapshots every step fails the same check."""
    from conftest import SP1024

    def run():
        h = tiny_h(data_path=str(short_val_shards), tokenizer_path=str(SP1024), weight_averaging="swa", swa_every=2,
                   swa_start_frac=0.9, iterations=8, warmdown_iters=4, warmup_steps=0, val_loss_every=0,
                   eval_diagnostics=False)
        sp, train_files, val_files = train_gpt.check_inputs(h)
        torch.manual_seed(h.seed)
        model, lines, after = GPT(h), [], []
        step_fn = train_gpt.Optimizers.step
        monkeypatch.setattr(train_gpt.Optimizers, "step", lambda self, scale, *a: step_fn(self, scale, *a) or after.append(
            (scale, [p.detach().clone() for p in model.parameters()])))
        result = train_gpt.train(h, CPU, model, train_gpt.TrainingData(train_files, h.vocab_size),
                                 train_gpt.load_validation(h, sp, val_files, CPU.device), lines.append)
        train_gpt.apply_average(model, result.averager)
        picked = [w for s, (scale, w) in enumerate(after, 1) if s % 2 == 0 and scale < 0.9]
        return model, picked, lines

    model, picked, lines = run()
    assert len(picked) == 2 and "swa:start step:6" in lines  # scales 1, 1, 1, 1, 1, .75, .5, .25: steps 6 and 8
    for p, *snapshots in zip(model.parameters(), *picked):
        torch.testing.assert_close(p.detach(), sum(snapshots) / len(snapshots), rtol=1e-6, atol=1e-7)
    monkeypatch.setattr(train_gpt.SWA, "step", lambda self, params, step, scale, f=train_gpt.SWA.step:
                        f(self, params, self.every * step, 0.0))
    model, picked, _ = run()
    with pytest.raises(AssertionError):
        for p, *snapshots in zip(model.parameters(), *picked):
            torch.testing.assert_close(p.detach(), sum(snapshots) / len(snapshots), rtol=1e-6, atol=1e-7)


# ---- GPTQ's block size and damping --------------------------------------------------------------------------


def _gptq_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, 96, generator=g) * torch.logspace(-1, 0.5, 96)  # inputs of different scales
    H = X.T @ X / 512
    w = torch.randn(32, 96, generator=g)
    return w, H


def test_gptq_block_size_changes_only_the_order_of_the_arithmetic(monkeypatch):
    """Lazy batch updates (GPTQ's blocks) are an exact rewrite: every GPTQ_BLOCK_SIZE gives the same integers up to
    rounding ties flipped by fp32 order (observed: none here), and the knob reaches _gptq from quantize_tensor.
    Control: a block update that drops the trailing columns' correction changes the result."""
    w, H = _gptq_problem()
    q128, s = train_gpt.quantize_rows(w, 4, H, clips=(1.0,), block=128)
    for block in (1, 7, 32):
        q, s2 = train_gpt.quantize_rows(w, 4, H, clips=(1.0,), block=block)
        assert torch.equal(s2, s) and (q != q128).float().mean() <= 0.002, block
    seen = []
    gptq = train_gpt._gptq
    monkeypatch.setattr(train_gpt, "_gptq", lambda *a, **k: seen.append(a[4:6]) or gptq(*a, **k))
    train_gpt.quantize_tensor(tiny_h(gptq_block_size=7, gptq_damp=0.05), "blocks.0.mlp.fc.weight", w, 4, H)
    assert seen == [(7, 0.05)]
    matmul = torch.Tensor.__matmul__  # the control: W[:, i2:] -= Eb @ U[i1:i2, i2:] dropped
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: matmul(a, b) * (0 if a.dim() == 2 and b.dim() == 2
                                                                                 and a.size(1) == 32 else 1))
    q, _ = train_gpt.quantize_rows(w, 4, H, clips=(1.0,), block=32)
    assert (q != q128).float().mean() > 0.01


def test_gptq_damp_adds_that_fraction_of_the_mean_diagonal(monkeypatch):
    """GPTQ_DAMP: the Hessian GPTQ factors is H + damp * mean(diag H) * I (in act-order), and another damping gives
    other integers. Control: the diagonal of a run at 0.1 is not that of 0.01."""
    w, H = _gptq_problem(1)
    seen, cholesky = [], torch.linalg.cholesky
    monkeypatch.setattr(torch.linalg, "cholesky", lambda A, **k: seen.append(A.clone()) or cholesky(A, **k))
    results = {}
    for damp in (0.01, 0.1):
        seen.clear()
        results[damp] = train_gpt.quantize_rows(w, 4, H, clips=(1.0,), damp=damp)[0]
        expected = (H.diagonal() + damp * H.diagonal().mean()).sort(descending=True).values
        torch.testing.assert_close(seen[0].diagonal(), expected)
        off = seen[0] - torch.diag(seen[0].diagonal())
        perm = H.diagonal().argsort(descending=True)
        torch.testing.assert_close(off, (H - torch.diag(H.diagonal()))[perm][:, perm])
    assert not torch.equal(results[0.01], results[0.1])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(seen[0].diagonal(), (H.diagonal() + 0.01 * H.diagonal().mean()).sort(
            descending=True).values)


# ---- late QAT --------------------------------------------------------------------------------------------


def test_late_qat_that_would_fake_quantize_nothing_is_refused():
    """Block matrices within FP16_MAX_NUMEL export as fp16 and are not fake-quantized: the seed stack's 65,536 at
    d=64 leaves its late QAT nothing to do (issue 28 found its proxy runs bit-identical with and without it)."""
    h = tiny_h(late_qat_threshold=0.15)  # tiny.env's FP16_MAX_NUMEL=1024: the d=64 matrices are int6
    assert any(m.qat_bits == 6 for m in GPT(h).modules() if isinstance(m, train_gpt.QATLinear))
    for over in (dict(fp16_max_numel=65_536), dict(fp16_max_numel=12_288), dict(quant_mlp_bits=16, quant_attn_bits=16)):
        with pytest.raises(train_gpt.ConfigError, match="^LATE_QAT_THRESHOLD=0.15: fake-quantizes nothing"):
            tiny_h(late_qat_threshold=0.15, **over)
    tiny_h(late_qat_threshold=0.15, fp16_max_numel=12_287)  # the MLP's 64 x 192 = 12,288 are quantized


def test_late_qat_changes_the_compiled_forward():
    """The switch is a tensor the compiled graph reads: flipping it changes the inductor-compiled training forward,
    to the model with fake-quantized block matrices (the records' Python class flag was constant-folded)."""
    torch.manual_seed(0)
    h = tiny_h(late_qat_threshold=0.5, quant_mlp_bits=4, quant_attn_bits=5)
    model = randomized(GPT(h))
    assert model.blocks[0].mlp.fc.qat_bits == 4 and model.blocks[0].attn.c_q.qat_bits == 5
    assert model.bigram.proj.__class__ is torch.nn.Linear  # fp16-stored projections are not fake-quantized
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model.forward_logits, backend="inductor", dynamic=False, fullgraph=True)
    x = torch.randint(0, 1024, (2, 16))
    before = compiled(x)
    train_gpt.set_qat(model, True)
    after = compiled(x)
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, and QAT on reuses the graph
    assert not torch.allclose(before, after)
    reference = GPT(h)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, m in reference.named_modules():
            if isinstance(m, train_gpt.QATLinear) and m.qat_bits:
                m.weight.copy_(train_gpt.fake_quantize(m.weight, m.qat_bits))
    torch.testing.assert_close(after, reference.forward_logits(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(before, model.eval().forward_logits(x), rtol=1e-4, atol=1e-4)  # eval: no QAT


def test_qat_gradient_is_straight_through():
    torch.manual_seed(0)
    layer = train_gpt.QATLinear(16, 8)
    layer.qat_bits = 4
    layer.qat_on.fill_(1.0)
    x = torch.randn(5, 16)
    layer(x).square().sum().backward()
    wq = train_gpt.fake_quantize(layer.weight.detach(), 4)
    expected = 2 * (x @ wq.T).T @ x  # d/dW of |x Wq^T|^2, passed straight through to W
    torch.testing.assert_close(layer.weight.grad, expected)


# ---- calibration respects the rules ----------------------------------------------------------------------


def test_training_calibration_stops_within_its_budget(sample_shards):
    h = tiny_h(gptq_calib_tokens=10**9)
    data = train_gpt.TrainingData([str(sample_shards / "fineweb_train_000000.bin")], 1024)
    loader = train_gpt.DistributedTokenLoader(data, 0, 1)
    assert list(train_gpt.training_batches(h, CPU, loader, budget_ms=0.0)) == []
    few = tiny_h(gptq_calib_tokens=300)
    sizes = [x.numel() for x in train_gpt.training_batches(few, CPU, loader, None)]
    assert sizes == [256, 64]  # a training-size batch, then the rest rounded up to whole 64-token sequences
    capped = tiny_h(max_wallclock_seconds=600.0, gptq_reserve_seconds=14.0)
    assert capped.loop_cap_ms == 586_000 and tiny_h(max_wallclock_seconds=600.0, quant_method="rtn").loop_cap_ms == 600_000


def _calibration_rank(rank, world_size, shards):
    """Two training steps, then calibration on 300 tokens: 5 sequences, shares of 2 and 3 at 2 ranks, smaller
    than a training micro-batch (4 sequences). Returns this rank's calibration inputs and the Hessians."""
    d = train_gpt.Dist(rank, world_size, 0, torch.device("cpu"))
    h = tiny_h(gptq_calib_tokens=300)
    data = train_gpt.TrainingData(sorted(map(str, shards.glob("fineweb_train_*.bin"))), 1024)
    loader = train_gpt.DistributedTokenLoader(data, rank, world_size)
    for _ in range(2 * d.grad_accum_steps):
        loader.next_batch(h.train_batch_tokens // train_gpt.MICROBATCHES, h.train_seq_len, d.device)
    batches = list(train_gpt.training_batches(h, d, loader, None))
    torch.manual_seed(0)
    hessians, n = train_gpt.collect_hessians(randomized(GPT(h)), batches, d)
    return torch.cat(batches) if batches else torch.zeros(0, h.train_seq_len, dtype=torch.long), hessians, n


def test_training_calibration_reads_the_same_tokens_on_one_and_two_ranks(sample_shards):
    """The calibration tokens are those right after the last training batch (the loader's read-ahead is given
    back), the same set for any world size, split into contiguous rank shares: the Hessians agree."""
    x1, h1, n1 = _calibration_rank(0, 1, sample_shards)
    data = train_gpt.TrainingData(sorted(map(str, sample_shards.glob("fineweb_train_*.bin"))), 1024)
    start = 2 * train_gpt.MICROBATCHES * (2048 // train_gpt.MICROBATCHES + 1)  # two steps of 8 spans of 256 + 1
    stream = train_gpt.TokenStream(data).take(start + 5 * 64)[start:]
    assert n1 == 5 * 64 and np.array_equal(x1.flatten().numpy(), stream)
    ranks = run_distributed(_calibration_rank, 2, sample_shards)
    assert [len(x) for x, _, _ in ranks] == [2, 3] and torch.equal(torch.cat([x for x, _, _ in ranks]), x1)
    for _, h2, n2 in ranks:
        assert n2 == n1 and h2.keys() == h1.keys()
        for k in h1:
            torch.testing.assert_close(h2[k], h1[k], rtol=1e-5, atol=1e-6)


def test_self_generated_calibration_reads_no_data():
    torch.manual_seed(0)
    h = tiny_h(gptq_calib_tokens=100, train_seq_len=16, eval_stride=16)
    model = randomized(GPT(h))
    batches = list(train_gpt.generated_batches(h, CPU, model, bos_id=1, batch=4))
    assert [b.shape for b in batches] == [(4, 16), (3, 16)]  # ceil(100 / 16) = 7 sequences
    assert all((b[:, 0] == 1).all() for b in batches)
    again = list(train_gpt.generated_batches(h, CPU, model, bos_id=1, batch=4))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # seeded by SEED and rank


# ---- rate control: narrowing whole tensors to fit ---------------------------------------------------------


def test_entropy_bytes():
    assert train_gpt.entropy_bytes(torch.zeros(100, dtype=torch.int8)) == 0
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(64)  # 16 equally likely symbols: 4 bits each
    assert train_gpt.entropy_bytes(q) == pytest.approx(len(q) * 4 / 8)


def test_fit_artifact_narrows_the_cheapest_tensors_then_fits(real_hessians):
    """A target far below what +-1 pruning can reach: whole matrices go one bit narrower, those whose output
    error grows least per byte saved first, and the artifact fits."""
    model, hessians = real_hessians
    h = _h(num_layers=2, ve_layers="1", fp16_max_numel=1024, compressor="zstd")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    kinds = {n: k for k, members in train_gpt.param_groups(model).items() for n, _ in members}
    full = len(train_gpt.encode_artifact(*train_gpt.quantize_state(h, sd, kinds, hessians), "zstd"))
    target = int(full * 0.85)
    for strategy, fits in (("prune", False), ("bits", True)):
        lines = []
        blob = train_gpt.fit_artifact(dataclasses.replace(h, fit_strategy=strategy), sd,
                                      kinds, hessians, target, lines.append)
        assert (len(blob) <= target) == fits
    narrowed = dict(kv.split(":int") for kv in next(l for l in lines if l.startswith("narrow_to_fit")).split()[10:])
    assert narrowed and set(narrowed) <= set(hessians) and set(map(int, narrowed.values())) <= {4, 5}
    meta = train_gpt.unpack_tensors(train_gpt.decompress(blob[39:], "zstd"))[1]
    assert all(meta["tensors"][n]["bits"] == int(b) for n, b in narrowed.items())  # the artifact says so
    loaded = train_gpt.decode_artifact(blob, h, "x")
    GPT(h).load_state_dict(loaded, strict=True)
    none = train_gpt.fit_artifact(dataclasses.replace(h, fit_strategy="none"), sd, kinds,
                                  hessians, target, lambda m: None)
    assert len(none) == full


# ---- the final records' export extras: GPTQ'd embedding, int8 gates, LQER, AWQ-lite ---------------------


def _final_normed_hidden(model, x):
    """The head's input, computed by hand: rms_norm of the last block's output (no parallel lanes here)."""
    outs = []
    hook = model.blocks[model.orders[model.looping][-1]].register_forward_hook(lambda m, a, o: outs.append(o))
    with torch.no_grad():
        logits = model.forward_logits(x)
    hook.remove()
    return train_gpt.rms_norm(outs[-1]).flatten(0, 1).float(), logits


@pytest.mark.parametrize("tied, loops", [(True, 0), (False, 1)])
def test_gptq_embed_hessian_is_the_mean_outer_product_of_the_final_normed_states(tied, loops):
    """GPTQ_EMBED (PR #1855): the head weight's Hessian is E[x x^T] of the final-norm output, whatever the model
    runs (looped or not), stored under the head weight's name; logits = x W^T confirms x is the head's input."""
    looped = dict(num_loops=1, loop_start=1, loop_end=1) if loops else {}
    h = _h(num_layers=3, tie_embeddings=tied, ve_layers="1", **looped)
    model = randomized(GPT(h), 3).eval()
    x = torch.randint(0, h.vocab_size, (3, 64), generator=torch.Generator().manual_seed(0))
    X, logits = _final_normed_hidden(model, x)
    W = model.tok_emb.weight if tied else model.lm_head.weight
    torch.testing.assert_close(logits.flatten(0, 1), h.logit_softcap * torch.tanh(X @ W.detach().T / h.logit_softcap))
    hessians, n = train_gpt.collect_hessians(model, [x], CPU, head=True)
    key = "tok_emb.weight" if tied else "lm_head.weight"
    torch.testing.assert_close(hessians[key], X.T @ X / n, rtol=1e-5, atol=1e-6)
    assert key not in train_gpt.collect_hessians(model, [x], CPU)[0]  # off: the block matrices only


def test_gptq_embed_quantizes_the_head_with_its_hessian_below_round_to_nearest():
    h = _h(quant_embed_bits=5)
    model = randomized(GPT(h), 1).eval()
    x = torch.randint(0, h.vocab_size, (8, 64), generator=torch.Generator().manual_seed(1))
    hessians, _ = train_gpt.collect_hessians(model, [x], CPU, head=True)
    kinds = {n: k for k, members in train_gpt.param_groups(model).items() for n, _ in members}
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    X, _ = _final_normed_hidden(model, x)
    w = sd["tok_emb.weight"]
    head_err = lambda t: float((X @ (w - train_gpt.dequantize_rows(t["tok_emb.weight.q"],  # noqa: E731
                                                                   t["tok_emb.weight.scale"])).T).square().sum())
    on = train_gpt.quantize_state(dataclasses.replace(h, gptq_embed=True), sd, kinds, hessians)[0]
    blocks_only = {k: v for k, v in hessians.items() if k != "tok_emb.weight"}  # what calibration collects when off
    off = train_gpt.quantize_state(h, sd, kinds, blocks_only)[0]  # the clip search
    rtn = train_gpt.quantize_state(_h(quant_embed_bits=5, quant_method="rtn"), sd, kinds)[0]
    assert head_err(on) < 0.9 * head_err(rtn) and head_err(on) < head_err(off)
    assert torch.equal(off["tok_emb.weight.q"], train_gpt.quantize_rows(w, 5)[0])
    assert _h(gptq_embed=True, quant_method="rtn").used("gptq_embed") is None  # dormant: no Hessian to use


@pytest.mark.parametrize("gate", ["sparse", "dense"])
def test_quant_gate_bits_stores_the_attention_gates_int8_within_half_a_step(gate):
    h = _h(attn_gate=gate, quant_gate_bits=8)
    model, sd, kinds = _state(h)
    name = "blocks.0.attn.gate_w"
    assert train_gpt.quant_bits(h, name, kinds[name], sd[name].shape) == 8
    assert train_gpt.quant_bits(_h(attn_gate=gate, quant_gate_bits=16), name, kinds[name], sd[name].shape) == 16
    tensors, meta = train_gpt.quantize_state(h, sd, kinds)
    s = tensors[name + ".scale"].float()[:, None]
    assert tensors[name + ".q"].abs().amax(1).eq(127).all()  # round to nearest at the row max
    assert ((train_gpt.dequantize_state(tensors, meta)[name] - sd[name]).abs() <= s / 2).all()
    with pytest.raises(train_gpt.ConfigError, match="QUANT_GATE_BITS=16: has no effect unless ATTN_GATE!=none"):
        _h(quant_gate_bits=16)  # the seed stack has no gate


def _lqer_h(**kw):
    return _h(num_layers=2, ve_layers="1", fp16_max_numel=1024, quant_method="rtn", quant_mlp_bits=4,
              quant_attn_bits=4, quant_embed_bits=5, **kw)


def test_lqer_correction_is_within_the_eckart_young_bound_plus_the_factor_noise():
    """A B = U_r S_r V_r^T misses E by the Eckart-Young tail sqrt(sum_{i>r} sigma_i^2); every factor code is
    within half its step (A: max|A|/1.5 on {-2..1}; B: per group max/7.5 on [-8, 7]; per-row INT4 when B is not
    whole groups), so with B's orthonormal rows ||E - A_hat B_hat||_F <= tail + ||A - A_hat||_F +
    ||A_hat||_F ||B - B_hat||_F <= tail + ||step_A / 2||_F + ||A_hat||_F ||step_B / 2||_F; and it beats no
    correction."""
    for group, cols in ((32, 256), (64, 200)):  # 2 x 200 = 400 elements: not whole groups of 64
        g = torch.Generator().manual_seed(cols)
        w = torch.randn(96, cols, generator=g) * torch.linspace(0.2, 2, cols)  # column scales: E is not white
        q, s = train_gpt.quantize_rows(w, 3, clips=(1.0,))
        E = w - train_gpt.dequantize_rows(q, s)
        group = group if 2 * cols % group == 0 else 0
        f = train_gpt.lqer_factors(E, 2, group)
        corr = train_gpt.lqer_correction({f"x.{k}": v for k, v in f.items()}, "x", group)
        U, S, Vh = torch.linalg.svd(E, full_matrices=False)
        A, B = U[:, :2] * S[:2], Vh[:2]
        if group:
            assert f["lqer_a"].min() >= -2 and f["lqer_a"].max() <= 1 and f["lqer_b"].min() >= -8
            assert f["lqer_b"].max() <= 7 and f["lqer_sa"].numel() == 1 and f["lqer_sb"].numel() == 2 * cols // group
            step_a = f["lqer_sa"].float().expand_as(A)
            step_b = f["lqer_sb"].float()[:, None].expand(-1, group).reshape_as(B)
        else:
            assert f["lqer_a"].abs().max() <= 7 and f["lqer_b"].abs().max() <= 7 and f["lqer_sb"].numel() == 2
            step_a, step_b = (f[k].float()[:, None].expand_as(x) for k, x in (("lqer_sa", A), ("lqer_sb", B)))
        A_hat, B_hat = f["lqer_a"].float() * step_a, f["lqer_b"].float() * step_b
        torch.testing.assert_close(corr, A_hat @ B_hat)
        slack = 1 + 2.0**-7  # an fp16 scale rounded down by <= 2^-11 moves the extreme code (7.5 steps) by 15x that
        assert ((A - A_hat).abs() <= step_a / 2 * slack).all() and ((B - B_hat).abs() <= step_b / 2 * slack).all()
        tail = float(S[2:].square().sum().sqrt())
        bound = tail + float((step_a / 2).norm() + A_hat.norm() * (step_b / 2).norm()) * slack
        err = float((E - corr).norm())
        assert tail < err <= bound and err < float(E.norm())


def test_lqer_factors_go_to_the_top_k_tensors_by_error_and_correct_them():
    h, off = _lqer_h(lqer_rank=2, lqer_top_k=2), _lqer_h()
    model, sd, kinds = _state(h, seed=2)
    plain, meta0 = train_gpt.quantize_state(off, sd, kinds)
    deq0 = train_gpt.dequantize_state(plain, meta0)
    err = {n: float((sd[n] - deq0[n]).norm()) for n, i in meta0["tensors"].items() if 0 < i["bits"] < 16}
    top = sorted(err, key=err.get, reverse=True)[:2]
    tensors, meta = train_gpt.quantize_state(h, sd, kinds)
    assert {n for n, i in meta["tensors"].items() if "lqer" in i} == set(top)
    assert {k.rsplit(".", 1)[0] for k in tensors if ".lqer_" in k} == set(top)
    assert all(torch.equal(tensors[k], plain[k]) for k in plain)  # the codes themselves are unchanged
    deq = train_gpt.dequantize_state(tensors, meta)
    for n in top:
        assert float((sd[n] - deq[n]).norm()) < err[n]


def test_every_extra_on_round_trips_bit_exactly_and_off_adds_nothing(real_hessians):
    model, hessians = real_hessians
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    kinds = {n: k for k, members in train_gpt.param_groups(model).items() for n, _ in members}
    base = dict(num_layers=2, ve_layers="1", fp16_max_numel=1024, compressor="zstd")
    h = _h(**base, lqer_rank=2, lqer_top_k=4, lqer_group=32, awq_lite_groups=2)
    tensors, meta = train_gpt.quantize_state(h, sd, kinds, hessians)
    infos = meta["tensors"].values()
    assert sum("awq" in i for i in infos) >= 1 and sum("lqer" in i for i in infos) == 4
    assert {n for n, i in meta["tensors"].items() if "lqer" in i} <= set(hessians)  # with Hessians: GPTQ'd only
    expected = train_gpt.dequantize_state(tensors, meta)
    for compressor in ("zstd", "rans"):  # the factors and AWQ's tensors through either coder
        blob = train_gpt.encode_artifact(tensors, meta, compressor)
        assert blob == train_gpt.encode_artifact(*train_gpt.quantize_state(h, sd, kinds, hessians), compressor)
        loaded = train_gpt.decode_artifact(blob, h, "x")
        assert all(torch.equal(loaded[n], expected[n]) for n in sd)
    GPT(h).load_state_dict(loaded, strict=True)
    plain, meta0 = train_gpt.quantize_state(_h(**base), sd, kinds, hessians)
    assert not any(k.endswith((".awq", ".awq_scale")) or ".lqer_" in k for k in plain)
    assert all(set(i) == {"dtype", "bits"} for i in meta0["tensors"].values())


def test_lqer_and_awq_artifacts_still_fit_the_target(real_hessians):
    """The factors are part of what the fit measures: narrowing refits them, and the final artifact fits."""
    model, hessians = real_hessians
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    kinds = {n: k for k, members in train_gpt.param_groups(model).items() for n, _ in members}
    h = _h(num_layers=2, ve_layers="1", fp16_max_numel=1024, compressor="zstd", lqer_rank=2, lqer_top_k=3,
           awq_lite_groups=1)
    tensors, meta = train_gpt.quantize_state(h, sd, kinds, hessians)
    full = len(train_gpt.encode_artifact(tensors, meta, "zstd"))
    lines = []
    blob = train_gpt.fit_artifact(h, sd, kinds, hessians, int(full * 0.85), lines.append)
    assert len(blob) <= int(full * 0.85)
    GPT(h).load_state_dict(train_gpt.decode_artifact(blob, h, "x"), strict=True)
    narrowed = dict(kv.split(":int") for kv in next(l for l in lines if l.startswith("narrow_to_fit")).split()[10:])
    assert set(narrowed) & {n for n, i in meta["tensors"].items() if "lqer" in i}  # some corrected tensors narrowed
    assert not set(narrowed) & {n for n, i in meta["tensors"].items() if "awq" in i}  # AWQ's tensor keeps its width
    train_gpt.narrow_to_fit(h, sd, hessians, tensors, meta, full - int(full * 0.85), lambda m: None)
    for n in narrowed:
        if "lqer" in meta["tensors"][n]:  # refitted to the narrowed tensor's error
            again = {k: v for k, v in tensors.items() if ".lqer_" not in k}
            train_gpt.set_lqer(h, sd[n], again, meta, n)
            assert all(torch.equal(again[f"{n}.{k}"], tensors[f"{n}.{k}"]) for k in ("lqer_a", "lqer_b", "lqer_sb"))


def test_awq_lite_protects_the_groups_the_saliency_score_picks():
    """Score s_j = a_j mean_i |W_ij| with a_j = sqrt(H_jj / passes), summed over aligned groups of 64 columns in
    one list over the model. The heaviest weights (group 0 of fc) and the loudest inputs (the leftover columns
    of fc, never candidates) lose to proj's group 1, where both are moderate."""
    h = tiny_h(awq_lite_groups=1, num_loops=1, loop_start=1, loop_end=1, num_layers=3)
    fc, proj = torch.full((8, 200), 0.1), torch.full((8, 128), 0.1)
    fc[:, :64], fc[:, 192:] = 10.0, 1.0
    proj[:, 64:] = 1.0
    a_fc, a_proj = torch.full((200,), 0.1), torch.ones(128)
    a_fc[192:] = 100.0  # the leftover 8 columns: far the largest score, but not a whole group
    a_proj[64:] = 3.0
    sd = {"blocks.0.mlp.fc.weight": fc, "blocks.1.mlp.proj.weight": proj}
    hess = {"blocks.0.mlp.fc.weight": torch.diag(a_fc**2), "blocks.1.mlp.proj.weight": torch.diag(2 * a_proj**2)}
    # group scores: fc g0 = 64 * 0.1 * 10 = 64, fc g1/g2 = 0.64, proj g0 = 6.4, proj g1 = 64 * 3 * 1 = 192 (its H
    # counts the layer's 2 passes, so it is divided by 2 first)
    bits = {n: 6 for n in sd}
    assert train_gpt.awq_groups(h, sd, bits, hess) == {"blocks.1.mlp.proj.weight": [64]}
    two = train_gpt.awq_groups(dataclasses.replace(h, awq_lite_groups=2), sd, bits, hess)
    assert two == {"blocks.1.mlp.proj.weight": [64], "blocks.0.mlp.fc.weight": [0]}
    assert train_gpt.awq_groups(h, sd, {n: 8 for n in sd}, hess) == {}  # already at AWQ_LITE_BITS: no candidate
    assert train_gpt.awq_groups(h, sd, bits, None) == {}  # no Hessians


def test_awq_lite_columns_are_quantized_on_the_fine_grid_inside_the_same_solve():
    torch.manual_seed(0)
    w = torch.randn(32, 192)
    hi = train_gpt.awq_mask(192, [64], 64)
    H = torch.diag(torch.rand(192) + 0.5)  # diagonal: no error feedback, so every code is plain rounding
    q, s, s_hi = train_gpt.quantize_rows(w, 4, H, clips=(1.0,), hi=hi, hi_bits=8)
    err = (w - train_gpt.dequantize_rows(q, s, (hi, s_hi))).abs()
    assert (err[:, hi] <= s_hi.float()[:, None] / 2).all() and (err[:, ~hi] <= s.float()[:, None] / 2).all()
    assert q[:, hi].abs().max() > 7 and q[:, ~hi].abs().max() <= 7
    assert torch.equal(s_hi, train_gpt.row_scale(w.abs().amax(1), 127))  # the base clip over 127
    X = torch.randn(512, 192) @ (torch.eye(192) + 0.3 * torch.randn(192, 192))  # correlated inputs: GPTQ feeds
    H = X.T @ X / 512                                                          # errors across the precisions
    out_err = lambda r: float(((w - r) @ H * (w - r)).sum())  # noqa: E731
    q, s, s_hi = train_gpt.quantize_rows(w, 4, H, clips=(1.0,), hi=hi)
    q0, s0 = train_gpt.quantize_rows(w, 4, H, clips=(1.0,))
    assert out_err(train_gpt.dequantize_rows(q, s, (hi, s_hi))) < out_err(train_gpt.dequantize_rows(q0, s0))


def test_the_export_log_line_names_the_extras_that_are_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    for kw, extras in (({}, "none"), (dict(attn_gate="sparse", quant_gate_bits=8, gptq_embed=True, lqer_rank=2,
                                           lqer_top_k=4, lqer_group=32, awq_lite_groups=1),
                                      "gptq_embed+gate_int8+lqer_r2_top4_g32+awq1x64_int8")):
        h = _h(run_id="x", compressor="zlib", **kw)
        model = randomized(GPT(h))
        hessians, _ = train_gpt.collect_hessians(model, [torch.randint(0, 1024, (2, 64))], CPU, h.gptq_embed)
        lines = []
        train_gpt.export(h, model, hessians, 1000, lines.append)
        line = next(l for l in lines if l.startswith("quantization method:gptq bits:mlp6/attn6/embed8 clip:search"))
        assert f" extras:{extras} " in line
