"""Shard reading, the training stream, rank slicing and the validation data."""

import numpy as np
import pytest
import sentencepiece as spm
import torch
from build_shards import write_shard
from conftest import SP1024, tiny_h

import train_gpt
from train_gpt import MICROBATCHES, DistributedTokenLoader, TokenStream


def test_shard_round_trip_and_header(tmp_path):
    tokens = np.array([1, 0, 65535, 7, 1024], dtype=np.uint16)
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert list(header[:3]) == [20240520, 1, 5] and not header[3:].any()
    assert np.array_equal(train_gpt.load_data_shard(str(path)), tokens)
    assert train_gpt.read_shard_header(str(path)) == 5


@pytest.mark.parametrize("corrupt, message", [
    (lambda raw: b"\0" * 4 + raw[4:], "not a token shard"),  # bad magic
    (lambda raw: raw[:4] + (2).to_bytes(4, "little") + raw[8:], "not a token shard"),  # bad version
    (lambda raw: raw[:-1], "truncated or corrupt"),
    (lambda raw: raw + b"\0\0", "truncated or corrupt"),
    (lambda raw: raw[:100], "not a token shard"),  # shorter than the header
])
def test_corrupt_shards_are_errors_naming_the_file(tmp_path, corrupt, message):
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ValueError, match=f"fineweb_val_000000.bin: .*{message}"):
        train_gpt.load_data_shard(str(path))


def test_token_ids_beyond_the_vocabulary_are_rejected(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.array([1, 5, 2000], dtype=np.uint16))
    with pytest.raises(ValueError, match="fineweb_train_000000.bin: token id 2000 >= VOCAB_SIZE=1024"):
        train_gpt.load_data_shard(str(path), 1024)


def _stream_files(tmp_path, sizes):
    """Shards whose tokens are their global stream positions, so every token identifies its position."""
    files, start = [], 0
    for i, n in enumerate(sizes):
        path = tmp_path / f"fineweb_train_{i:06d}.bin"
        write_shard(path, np.arange(start, start + n, dtype=np.uint16))
        files.append(str(path))
        start += n
    return files, start


def test_stream_crosses_shards_and_wraps_around(tmp_path):
    files, total = _stream_files(tmp_path, [5, 0, 7, 3])
    stream = TokenStream(train_gpt.TrainingData(files, 65536))
    got = np.concatenate([stream.take(4) for _ in range(10)])
    assert np.array_equal(got, np.arange(40) % total) and stream.epoch == 3


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_rank_slices_are_disjoint_and_cover_the_same_stream(tmp_path, world_size):
    files, _ = _stream_files(tmp_path, [3000, 2000])
    seq_len, local_tokens, steps = 8, 32, 3
    seen = []  # (position of each input token, rank)
    for rank in range(world_size):
        loader = DistributedTokenLoader(train_gpt.TrainingData(files, 65536), rank, world_size)
        for _ in range(steps * MICROBATCHES // world_size):
            x, y = loader.next_batch(local_tokens, seq_len, torch.device("cpu"))
            assert x.shape == (local_tokens // seq_len, seq_len) and torch.equal(y.flatten()[:-1], x.flatten()[1:])
            assert torch.equal(y, x + 1)  # targets are the next stream token
            seen += [(int(t), rank) for t in x.flatten()]
    positions = [p for p, _ in seen]
    assert len(positions) == len(set(positions))  # no token is an input twice, within or across ranks
    # the union is the single-process stream: each micro-batch span is local_tokens inputs + 1 target
    span = local_tokens + 1
    expected = {k * span + i for k in range(steps * MICROBATCHES) for i in range(local_tokens)}
    assert set(positions) == expected


def test_validation_data_counts_every_scored_byte(sample_shards):
    h = tiny_h(data_path=str(sample_shards), tokenizer_path=str(SP1024))
    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    val = train_gpt.load_validation(h, sp, [str(sample_shards / "fineweb_val_000000.bin")], torch.device("cpu"))
    raw = train_gpt.load_data_shard(str(sample_shards / "fineweb_val_000000.bin"))
    assert val.num_targets == (len(raw) - 1) // h.train_seq_len * h.train_seq_len
    assert np.array_equal(val.tokens, raw[: val.num_targets + 1])
    luts = train_gpt.build_byte_luts(sp, 1024)
    pieces = [sp.id_to_piece(int(t)) for t in val.tokens]
    by_hand = 0
    for prev, tok, piece in zip(val.tokens[:-1], val.tokens[1:], pieces[1:]):
        if sp.is_control(int(tok)) or sp.is_unknown(int(tok)):
            continue
        spaced = piece.startswith("\u2581")
        by_hand += len(piece[spaced:].encode()) + (spaced and not (sp.is_control(int(prev)) or sp.is_unknown(int(prev))))
    assert val.byte_count == by_hand == int(train_gpt.token_bytes(luts, torch.from_numpy(
        val.tokens[:-1].astype(np.int64)), torch.from_numpy(val.tokens[1:].astype(np.int64))).sum())


def test_prefetching_loader_yields_exactly_the_on_demand_batches(tmp_path):
    """The background read-ahead changes nothing: same batches in the same order, also when the batch size
    changes (the read-ahead of the old size is given back), and take() continues right where the last batch
    handed out ended, although the read-ahead had already crossed into the next shard."""
    files, _ = _stream_files(tmp_path, [530, 2000])
    loader = DistributedTokenLoader(train_gpt.TrainingData(files, 65536), 1, 2)
    sizes = [32, 32, 32, 64, 64, 32]
    got = [loader.next_batch(n, 8, torch.device("cpu"))[0] for n in sizes]
    stream, expected = TokenStream(train_gpt.TrainingData(files, 65536)), []
    for n in sizes:
        expected.append(torch.from_numpy(stream.take(2 * (n + 1))[n + 1 : 2 * n + 1].astype(np.int64)).view(-1, 8))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    end = 2 * sum(n + 1 for n in sizes)  # 524: the read-ahead of 66 tokens went past the first shard's 530
    loader.pending[1].result()
    assert loader.stream.file_idx == 1
    assert np.array_equal(loader.take(10), np.arange(end, end + 10))  # every rank gets them all
    assert np.array_equal(loader.take(5), np.arange(end + 10, end + 15))
