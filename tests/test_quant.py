"""The export pipeline: the quantization path (RTN, GPTQ-lite, GPTQ), the storage policy, pruning to the byte
cap, compression and the checksummed artifact, weight averaging and late QAT."""

import math
import pickle

import numpy as np
import pytest
import torch
from conftest import SP1024, run_distributed, tiny_h
from torch._dynamo.utils import counters
from test_model import CPU, randomized

import train_gpt
from train_gpt import GPT


def _h(**kw):
    return tiny_h(model_dim=128, num_heads=4, num_kv_heads=2, **kw)


def _state(h, seed=0):
    model = randomized(GPT(h), seed)
    kinds = {n: k for k, members in train_gpt.param_groups(model).items() for n, _ in members}
    return model, model.state_dict(), kinds


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
    for env, message in (({"QUANT_SIGMAS_MLP": "10"}, "QUANT_SIGMAS_MLP=10.0: must stay 11.5 unless QUANT_CLIP=sdclip"),
                         ({"QUANT_CLIP": "sdclip", "QUANT_METHOD": "gptq_lite"}, "QUANT_CLIP='sdclip': must be search"),
                         ({"QUANT_CLIP": "sdclip", "QUANT_METHOD": "rtn", "QUANT_SDCLIP_LAMBDA": "0.1"},
                          "QUANT_SDCLIP_LAMBDA=0.1: needs QUANT_METHOD=gptq")):
        with pytest.raises(train_gpt.ConfigError, match=message):
            train_gpt.Hyperparameters.from_env(env)


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


@pytest.mark.parametrize("compressor", train_gpt.COMPRESSORS)
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
    h, tensors, meta = quantized
    lines = []
    blob = train_gpt.prune_to_fit(h, tensors, meta, None, 100, lines.append)
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


# ---- late QAT --------------------------------------------------------------------------------------------


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
        blob = train_gpt.fit_artifact(train_gpt.Hyperparameters(**{**vars(h), "fit_strategy": strategy}), sd,
                                      kinds, hessians, target, lines.append)
        assert (len(blob) <= target) == fits
    narrowed = dict(kv.split(":int") for kv in next(l for l in lines if l.startswith("narrow_to_fit")).split()[10:])
    assert narrowed and set(narrowed) <= set(hessians) and set(map(int, narrowed.values())) <= {4, 5}
    meta = train_gpt.unpack_tensors(train_gpt.decompress(blob[39:], "zstd"))[1]
    assert all(meta["tensors"][n]["bits"] == int(b) for n, b in narrowed.items())  # the artifact says so
    loaded = train_gpt.decode_artifact(blob, h, "x")
    GPT(h).load_state_dict(loaded, strict=True)
    none = train_gpt.fit_artifact(train_gpt.Hyperparameters(**{**vars(h), "fit_strategy": "none"}), sd, kinds,
                                  hessians, target, lambda m: None)
    assert len(none) == full
