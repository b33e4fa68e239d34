"""COMPRESSOR=rans, the interleaved rANS coder of the int8 symbol tensors: bit-exact round trips of any container,
damage rejected, a coded size at the model's own entropy bound, and rows coded given the earlier rows they repeat.
(The tiny-model artifact round trip through decode_artifact is test_quant's, which runs every compressor.)"""

import numpy as np
import pytest
import torch

import train_gpt
from helpers import quant_h as _h
from helpers import quant_state as _state


def _laplace(rows, cols, bits, scale, seed):
    qmax = 2 ** (bits - 1) - 1
    g = np.random.default_rng(seed)
    return torch.from_numpy(np.clip(np.round(g.laplace(0, scale, (rows, cols))), -qmax, qmax).astype(np.int8))


def _container():
    g = torch.Generator().manual_seed(0)
    t = {f"l{b}.q": _laplace(37, 300, b, 2.0 ** (b - 4), b) for b in range(4, 9)}  # skewed, int4..int8
    t |= {f"u{b}.q": torch.randint(-(2 ** (b - 1)) + 1, 2 ** (b - 1), (64, 100), generator=g, dtype=torch.int8)
          for b in range(4, 9)}  # uniform
    t |= {"empty.q": torch.zeros(0, 16, dtype=torch.int8), "empty_cols.q": torch.zeros(5, 0, dtype=torch.int8),
          "one.q": torch.full((3, 7), -5, dtype=torch.int8), "scalar.q": torch.tensor(7, dtype=torch.int8),
          "vector.q": torch.arange(-100, 100, dtype=torch.int8), "scale": torch.rand(37).half(),
          "fp32": torch.randn(3, 4), "flags": torch.tensor([True, False])}
    meta = {"tensors": {f"l{b}": {"bits": b} for b in range(4, 9)}, "note": "kept"}
    return train_gpt.pack_tensors(t, meta)


def test_any_container_round_trips_bit_exact_and_deterministic():
    data = _container()
    payload = train_gpt.compress(data, "rans")
    assert train_gpt.decompress(payload, "rans") == data and train_gpt.compress(data, "rans") == payload
    lone = train_gpt.pack_tensors({"one.q": torch.full((1, 1), 3, dtype=torch.int8)}, {})
    assert train_gpt.decompress(train_gpt.compress(lone, "rans"), "rans") == lone
    none = train_gpt.pack_tensors({"x": torch.ones(3)}, {})
    assert train_gpt.decompress(train_gpt.compress(none, "rans"), "rans") == none


def test_damaged_streams_are_value_errors():
    payload = train_gpt.compress(_container(), "rans")
    size = int.from_bytes(payload[1:5], "little")
    words = 5 + size  # where the u16 words start
    flipped = [bytearray(payload) for _ in range(3)]
    flipped[0][words + 3] ^= 0x10  # a final state
    flipped[1][(words + len(payload)) // 2] ^= 0x01  # a renormalization word
    flipped[2][-1] ^= 0x80  # the last word
    for bad in (payload[:-2], payload[:-1], payload + b"\0\0", payload[: words + 10], payload[:3], *map(bytes, flipped)):
        with pytest.raises(ValueError, match="rans"):
            train_gpt.decompress(bad, "rans")


def test_coded_size_is_at_the_models_entropy_bound():
    """A Laplacian source whose rows have different scales: the information the stream holds (the words plus the
    final states' log2 beyond the initial 2^16) is within 0.1% of what the coder's own tables assign, which is
    within 0.3% of the empirical entropy under its contexts (the tables are stored as one-byte square roots),
    well below the order-0 entropy; the final states add under 4 bytes each."""
    scales = np.repeat([0.7, 2.0, 6.0], 100)
    q = np.clip(np.round(np.random.default_rng(1).laplace(0, scales[:, None], (300, 1024))), -31, 31).astype(np.int8)
    meta = {"tensors": {"w": {"bits": 6}}}
    payload = train_gpt.compress(train_gpt.pack_tensors({"w.q": torch.from_numpy(q)}, meta), "rans")
    head, words = train_gpt.decompress_best(payload, "rans")
    words = np.frombuffer(words, "<u2").astype(np.int64)
    lanes = min(train_gpt.RANS_LANES, -(-q.size // 1024))  # at least 1024 symbols a state
    states = words[:lanes] | words[lanes : 2 * lanes] << 16
    info = ((len(words) - 2 * lanes) * 16 + np.log2(states).sum() - 16 * lanes) / 8
    rest, meta = train_gpt.unpack_tensors(head)
    _, key, ref, _ = train_gpt.rans_contexts(rest, meta)
    assert (ref < 0).all()  # independent rows: no references
    table, freq = rest["rans.table"].numpy(), train_gpt.rans_freq(rest["rans.freq"].numpy())
    ctx, s = np.searchsorted(table, key), q.view(np.uint8).ravel()
    model = float(np.log2((1 << train_gpt.RANS_BITS) / freq[ctx, s]).sum()) / 8
    joint, marg = np.bincount(ctx * 256 + s), np.bincount(ctx)
    bound = float((joint * np.log2(np.maximum(joint, 1))).sum() * -1 + (marg * np.log2(np.maximum(marg, 1))).sum()) / 8
    assert model < info < model * 1.001 and bound < model < bound * 1.003 and len(words) * 2 < info + 4 * lanes
    assert bound < 0.97 * train_gpt.entropy_bytes(torch.from_numpy(q))


def _clustered(rows=600, cols=256, seed=0):
    """Noisy copies of 30 random int6 rows, shuffled: each row has near-duplicates among the earlier ones."""
    g = np.random.default_rng(seed)
    protos = np.clip(np.round(g.laplace(0, 6, (30, cols))), -31, 31)
    noise = g.integers(-1, 2, (rows, cols)) * (g.random((rows, cols)) < 0.1)
    return torch.from_numpy(np.clip(protos[g.integers(0, 30, rows)] + noise, -31, 31).astype(np.int8))


def _with_refs():
    g = np.random.default_rng(1)
    iid = torch.from_numpy(np.clip(np.round(g.laplace(0, 3, (600, 256))), -31, 31).astype(np.int8))
    t = {"emb.q": _clustered(), "iid.q": iid, "few.q": _clustered(rows=3), "emb.scale": torch.rand(600).half()}
    return train_gpt.pack_tensors(t, {"tensors": {n: {"bits": 6} for n in ("emb", "iid", "few")}})


def test_rows_that_repeat_earlier_rows_are_coded_given_their_references(monkeypatch):
    """The clustered matrix gets references (a row's two nearest earlier rows, at least `gap` rows back) and
    makes the container a quarter smaller than without; the independent and the 3-row matrix get none; exact."""
    data = _with_refs()
    payload = train_gpt.compress(data, "rans")
    rest, _ = train_gpt.unpack_tensors(train_gpt.decompress_best(payload, "rans")[0])
    assert [n for n in rest if n.endswith(".rans_ref")] == ["emb.q.rans_ref"]
    ref, gap = rest["emb.q.rans_ref"].numpy(), 2 + min(train_gpt.RANS_LANES, -(-1203 * 256 // 1024)) // 256
    assert ref.shape == (600, 2) and (ref[:gap] == -1).all() and (ref[gap:, 0] >= 0).all()
    assert (ref[gap:] <= np.arange(gap, 600)[:, None] - gap).all()  # decoded steps before they are read
    assert train_gpt.decompress(payload, "rans") == data and train_gpt.compress(data, "rans") == payload
    monkeypatch.setattr(train_gpt, "RANS_REFS", 0)
    without = train_gpt.compress(data, "rans")
    assert train_gpt.decompress(without, "rans") == data and len(payload) < 0.75 * len(without)


def test_damaged_references_and_tables_are_value_errors():
    payload = train_gpt.compress(_with_refs(), "rans")
    head, words = train_gpt.decompress_best(payload, "rans")
    for name, edit in (("emb.q.rans_ref", lambda r: r.fill_(5000)),  # past the last symbol
                       ("emb.q.rans_ref", lambda r: r.__setitem__(20, 500)),  # a row not decoded yet
                       ("rans.freq", lambda w: w.__setitem__((0, w[0].argmax()), 1))):  # another table
        rest, meta = train_gpt.unpack_tensors(head)
        edit(rest[name])
        with pytest.raises(ValueError, match="^rans: "):
            train_gpt.decompress(train_gpt.compress_best(train_gpt.pack_tensors(rest, meta)) + words, "rans")
@pytest.mark.slow  # over 5 s on 2 CPU cores (a dozen encodes)
def test_pruning_to_a_byte_target_works_with_rans():
    h = _h(fp16_max_numel=1024, quant_mlp_bits=5, quant_attn_bits=5, compressor="rans")
    _, sd, kinds = _state(h)
    tensors, meta = train_gpt.quantize_state(h, sd, kinds)
    full = len(train_gpt.encode_artifact(tensors, meta, "rans"))
    blob = train_gpt.prune_to_fit(h, tensors, meta, None, full - 400, lambda m: None)
    assert len(blob) <= full - 400 and train_gpt.decode_artifact(blob, h, "x").keys() == sd.keys()
