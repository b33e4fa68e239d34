"""COMPRESSOR=rans, the interleaved rANS coder of the int8 symbol tensors: bit-exact round trips of any container,
damage rejected, and a coded size at the model's own entropy bound. (The tiny-model artifact round trip through
decode_artifact is test_quant's, which runs every compressor.)"""

import numpy as np
import pytest
import torch

import train_gpt
from test_quant import _h, _state


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
    final states' log2 beyond the initial 2^16) is within 0.1% of the empirical entropy under the coder's own
    contexts, which is well below the order-0 entropy; the final states add under 4 bytes each."""
    scales = np.repeat([0.7, 2.0, 6.0], 100)
    q = np.clip(np.round(np.random.default_rng(1).laplace(0, scales[:, None], (300, 1024))), -31, 31).astype(np.int8)
    meta = {"tensors": {"w": {"bits": 6}}}
    payload = train_gpt.compress(train_gpt.pack_tensors({"w.q": torch.from_numpy(q)}, meta), "rans")
    words = np.frombuffer(payload[5 + int.from_bytes(payload[1:5], "little") :], "<u2").astype(np.int64)
    lanes = min(train_gpt.RANS_LANES, -(-q.size // 1024))  # at least 1024 symbols a state
    states = words[:lanes] | words[lanes : 2 * lanes] << 16
    info = ((len(words) - 2 * lanes) * 16 + np.log2(states).sum() - 16 * lanes) / 8
    rows, cols = map(torch.from_numpy, train_gpt.spread_codes(q))
    _, table, ctx = train_gpt.rans_contexts({"w.rans_rows": rows, "w.rans_cols": cols}, meta, None)
    bound = 0.0
    for k in range(len(table)):
        counts = np.bincount(q.ravel()[ctx == k].astype(np.int64) + 128)
        counts = counts[counts > 0]
        bound += float((counts * np.log2(counts.sum() / counts)).sum()) / 8
    assert bound < info < bound * 1.001 and len(words) * 2 < info + 4 * lanes
    assert bound < 0.97 * train_gpt.entropy_bytes(torch.from_numpy(q))


@pytest.mark.slow  # over 5 s on 2 CPU cores (a dozen encodes)
def test_pruning_to_a_byte_target_works_with_rans():
    h = _h(fp16_max_numel=1024, quant_mlp_bits=5, quant_attn_bits=5, compressor="rans")
    _, sd, kinds = _state(h)
    tensors, meta = train_gpt.quantize_state(h, sd, kinds)
    full = len(train_gpt.encode_artifact(tensors, meta, "rans"))
    blob = train_gpt.prune_to_fit(h, tensors, meta, None, full - 400, lambda m: None)
    assert len(blob) <= full - 400 and train_gpt.decode_artifact(blob, h, "x").keys() == sd.keys()
