"""COMPRESSOR=pergroup, the records' per-group lrzip (PR #1855): exact round trips of real quantized containers
and their edge cases, the layout it writes (greedy L1 row chains in the hot groups, matrices transposed), damage
rejected, and without the lrzip binary a configuration error naming the package. The tests that run lrzip skip
where it is not installed."""

import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_h
from helpers import quant_state as _state

import train_gpt

needs_lrzip = pytest.mark.skipif(shutil.which("lrzip") is None, reason="needs the lrzip binary (apt-get install lrzip)")


@pytest.fixture(scope="module")
def packed():
    """A tiny model quantized as exported, its int8 matrices cut to four groups (lrzip's start-up dominates), plus
    int8 edge cases: empty matrices, a 1-row matrix and an all-equal matrix in hot groups, a vector and a scalar
    (not matrices: left to the general compressor); coded once."""
    h = tiny_h()
    _, sd, kinds = _state(h)
    tensors, meta = train_gpt.quantize_state(h, sd, kinds)
    kept = ("tok_emb.", "blocks.0.attn.c_q.", "blocks.0.mlp.", "blocks.1.mlp.fc.")
    tensors = {n: t for n, t in tensors.items() if t.dtype != torch.int8 or t.dim() < 2 or n.startswith(kept)}
    tensors |= {"blocks.7.attn.c_q.weight.q": torch.zeros(0, 16, dtype=torch.int8),
                "blocks.7.mlp.proj.weight.q": torch.zeros(5, 0, dtype=torch.int8),
                "blocks.8.attn.c_q.weight.q": torch.arange(-3, 4, dtype=torch.int8)[None],
                "blocks.8.mlp.fc.weight.q": torch.full((9, 4), -5, dtype=torch.int8),
                "vector.q": torch.arange(-100, 100, dtype=torch.int8), "scalar.q": torch.tensor(7, dtype=torch.int8)}
    data = train_gpt.pack_tensors(tensors, meta)
    return data, train_gpt.compress(data, "pergroup") if shutil.which("lrzip") else None


@needs_lrzip
def test_containers_round_trip_bit_exact_and_deterministic(packed):
    data, payload = packed
    assert train_gpt.decompress(payload, "pergroup") == data and train_gpt.compress(data, "pergroup") == payload
    lone = train_gpt.pack_tensors({"x": torch.ones(3)}, {})  # no matrix at all
    assert train_gpt.decompress(train_gpt.compress(lone, "pergroup"), "pergroup") == lone


@needs_lrzip
def test_layout_is_greedy_l1_row_chains_written_transposed(packed):
    """Groups by kind in container order; a hot matrix's stored order starts at row 0 and always takes the nearest
    unused row (the first of equals: an all-equal matrix keeps its order); each group's lrzip stream holds its
    matrices in that row order, transposed; cold groups keep theirs."""
    tensors, _ = train_gpt.unpack_tensors(packed[0])
    head, streams = train_gpt.decompress_best(packed[1], "pergroup")
    rest, meta = train_gpt.unpack_tensors(head)
    kinds = [members[0][0].split(".", 2)[2] if members[0][0].startswith("blocks.") else members[0][0]
             for _, members in meta["pergroup"]]
    assert kinds == ["tok_emb.weight.q", "attn.c_q.weight.q", "mlp.fc.weight.q", "mlp.proj.weight.q"]
    perms = {n[:-5]: rest[n].numpy().view(np.uint16).astype(np.int64) for n in rest if n.endswith(".perm")}
    assert {n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in perms} == set(train_gpt.PERGROUP_HOT)
    assert (perms["blocks.8.mlp.fc.weight.q"] == np.arange(9)).all()
    for name, order in perms.items():
        q = tensors[name].numpy().astype(np.int64)
        assert order[0] == 0 and sorted(order) == list(range(len(q)))
        for i in range(1, len(q)):
            d = np.abs(q - q[order[i - 1]]).sum(1)
            d[order[:i]] = 1 << 30
            assert order[i] == d.argmin()
    at = 0
    for size, members in meta["pergroup"]:
        blob, at = train_gpt.lrzip(streams[at : at + size], "-d"), at + size
        order = {n: perms.get(n, np.arange(r)) for n, r, _ in members}
        assert blob == b"".join(tensors[n].numpy()[order[n]].T.tobytes() for n, _, _ in members)
    assert at == len(streams)


@needs_lrzip
def test_damaged_streams_are_value_errors(packed):
    payload = packed[1]
    head, streams = train_gpt.decompress_best(payload, "pergroup")
    flipped = bytearray(payload)
    flipped[len(head) + len(streams) // 2] ^= 0x10  # inside an lrzip stream
    rest, meta = train_gpt.unpack_tensors(head)
    order = rest["tok_emb.weight.q.perm"]
    order[1] = order[0]  # a repeated row
    repeated = train_gpt.compress_best(train_gpt.pack_tensors(rest, meta)) + streams
    rest, meta = train_gpt.unpack_tensors(head)
    meta["pergroup"][0][1][0][1] += 1  # a matrix one row longer than its group holds
    longer = train_gpt.compress_best(train_gpt.pack_tensors(rest, meta)) + streams
    for bad, message in ((payload[:-1], "truncated"), (payload[:3], "truncated"), (bytes(flipped), "lrzip -d failed"),
                         (repeated, "not a permutation"), (longer, "wrong size")):
        with pytest.raises(ValueError, match=f"^pergroup: .*{message}"):
            train_gpt.decompress(bad, "pergroup")


def test_without_the_binary_pergroup_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no lrzip on it
    assert shutil.which("lrzip") is None
    with pytest.raises(train_gpt.ConfigError, match=r"COMPRESSOR='pergroup': .*lrzip.*apt-get install lrzip"):
        tiny_h(compressor="pergroup")
    assert tiny_h(compressor="rans").compressor == "rans"
