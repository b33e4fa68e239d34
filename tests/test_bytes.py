"""Byte-exactness of the val_bpb denominator: train_gpt's byte tables against the text the tokens stand for.

The bytes of a document are those of its normalised text (sp.normalize, with "\u2581" for spaces; these
tokenizers strip leading/trailing whitespace and collapse runs, so it has no leading space)."""

import re

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import SP1024, SP8192

from train_gpt import build_byte_luts, token_bytes

SPACE = "\u2581"


def table_count(luts, ids: list[int], bos: int = 1) -> int:
    """Bytes the tables give a document as it sits in a shard: [BOS] + ids, every id scored after its prev."""
    t = torch.tensor([bos] + ids)
    return int(token_bytes(luts, t[:-1], t[1:]).sum())


def normalised_bytes(sp, text: str) -> int:
    return len(sp.normalize(text).replace(SPACE, " ").encode("utf-8"))


def _setup(model, vocab_size, texts):
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return sp, build_byte_luts(sp, vocab_size), sp.encode(texts)


@pytest.fixture(scope="module")
def sp8192(sample_texts):
    """(tokenizer, its byte tables, the encoded sample)"""
    return _setup(SP8192, 8192, sample_texts)


@pytest.fixture(scope="module")
def sp1024(sample_texts):
    return _setup(SP1024, 1024, sample_texts)


# --- real text -------------------------------------------------------------------------------------------


def test_byte_fallback_tokenizer_is_exact_on_every_document(sp8192, sample_texts):
    sp, luts, encoded = sp8192
    for text, ids in zip(sample_texts, encoded):
        assert table_count(luts, ids) == normalised_bytes(sp, text), text[:80]
    # the sample exercises what matters: multi-byte characters spelled in byte pieces (1 byte each), pieces with
    # a leading space, the lone space piece, and documents that are not pure ASCII
    flat = np.concatenate(encoded)
    assert np.isin(flat, np.arange(4 + 0x80, 4 + 0x100)).sum() > 100
    assert (flat == sp.piece_to_id(SPACE)).sum() > 0
    assert sum(not t.isascii() for t in sample_texts) > 50


def test_concatenated_stream_counts_the_sum_of_its_documents(sp8192, sample_texts):
    """The trainer scores one long stream; BOS between documents must stop a leading space being counted."""
    sp, luts, encoded = sp8192
    stream = torch.tensor(np.concatenate([[1] + ids for ids in encoded]))
    total = int(token_bytes(luts, stream[:-1], stream[1:]).sum())
    assert total == sum(normalised_bytes(sp, t) for t in sample_texts)


def test_no_byte_fallback_tokenizer_is_exact_without_unk(sp1024, sample_texts):
    sp, luts, encoded = sp1024
    clean = [(t, ids) for t, ids in zip(sample_texts, encoded) if sp.unk_id() not in ids]
    assert len(clean) > 150
    for text, ids in clean:
        assert table_count(luts, ids) == normalised_bytes(sp, text), text[:80]


def test_no_byte_fallback_tokenizer_deficit_is_the_documented_exception(sp1024, sample_texts):
    """Documented exception (no byte fallback): an out-of-vocabulary character becomes <unk>, which counts
    0 bytes (its text is lost: sp.decode prints " \u2047 " instead), and <unk> is a boundary, so the leading
    space of the piece after it is not counted either. The expected deficit is computed from the normalised
    text alone: the bytes of every character that has no piece, plus 1 for each such character followed by a
    space. Consecutive unknown characters form one <unk>."""
    sp, luts, encoded = sp1024
    unk, checked = sp.unk_id(), 0
    for text, ids in zip(sample_texts, encoded):
        if unk not in ids:
            continue
        norm = sp.normalize(text)
        unknown = "".join(c for c in set(norm) if sp.piece_to_id(c) == unk)  # characters without a piece
        runs = list(re.finditer(f"[{re.escape(unknown)}]+", norm))
        lost_text = sum(len(r.group().encode("utf-8")) for r in runs)
        lost_spaces = sum(norm.startswith(SPACE, r.end()) for r in runs)
        assert ids.count(unk) == len(runs)
        assert lost_text > 0
        assert table_count(luts, ids) == normalised_bytes(sp, text) - lost_text - lost_spaces, text[:80]
        checked += 1
    assert checked > 100


# --- unit tests on a stub tokenizer ----------------------------------------------------------------------


class StubSP:
    """The SentencePieceProcessor methods build_byte_luts uses, over a hand-written vocabulary."""

    PIECES = ["<pad>", "<s>", "</s>", "<unk>", "<0x41>", "<0xE2>", SPACE, f"{SPACE}the", "the", "\u00e9",
              f"{SPACE}\u4e2d\u6587", "<unused>", "\U0001F600"]
    KIND = {0: "control", 1: "control", 2: "control", 3: "unk", 4: "byte", 5: "byte", 11: "unused"}

    def vocab_size(self):
        return len(self.PIECES)

    def id_to_piece(self, i):
        return self.PIECES[i]

    def is_control(self, i):
        return self.KIND.get(i) == "control"

    def is_unknown(self, i):
        return self.KIND.get(i) == "unk"

    def is_unused(self, i):
        return self.KIND.get(i) == "unused"

    def is_byte(self, i):
        return self.KIND.get(i) == "byte"


PAD, BOS, EOS, UNK, BYTE_A, BYTE_E2, LONE, THE_SP, THE, E_ACUTE, CJK_SP, UNUSED, EMOJI = range(13)


@pytest.fixture(scope="module")
def stub_luts():
    return build_byte_luts(StubSP(), 16)


def test_stub_tables(stub_luts):
    assert stub_luts.base_bytes.dtype == torch.int16 and stub_luts.has_leading_space.dtype == torch.bool
    assert len(stub_luts.base_bytes) == len(stub_luts.has_leading_space) == len(stub_luts.is_boundary) == 16
    #                                     pad bos eos unk A  E2 ▁  ▁the the é  ▁中文 unused 😀 13 14 15
    assert stub_luts.base_bytes.tolist() == [0, 0, 0, 0, 1, 1, 0, 3, 3, 2, 6, 0, 4, 0, 0, 0]
    assert stub_luts.has_leading_space.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0]
    assert stub_luts.is_boundary.tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1, 1]


def test_stub_table_size_is_at_least_the_tokenizer_vocabulary():
    assert len(build_byte_luts(StubSP(), 4).base_bytes) == len(StubSP.PIECES)


def count(luts, prev: int, target: int) -> int:
    return int(token_bytes(luts, torch.tensor([prev]), torch.tensor([target]))[0])


def test_byte_pieces_count_one_byte(stub_luts):
    """Not len("<0x41>") = 6, nor the 3 bytes of U+FFFD: one byte of the text each."""
    for prev in (BOS, THE, BYTE_A):
        assert count(stub_luts, prev, BYTE_A) == count(stub_luts, prev, BYTE_E2) == 1


def test_leading_space_depends_on_the_previous_token(stub_luts):
    for prev in (THE, BYTE_A, E_ACUTE, LONE, EMOJI):  # normal pieces: the space is printed and counted
        assert count(stub_luts, prev, THE_SP) == 4
        assert count(stub_luts, prev, LONE) == 1
        assert count(stub_luts, prev, CJK_SP) == 7
    for prev in (BOS, UNK, PAD, EOS, UNUSED, 14):  # boundaries: no space counted (a document start after BOS)
        assert count(stub_luts, prev, THE_SP) == 3
        assert count(stub_luts, prev, LONE) == 0
        assert count(stub_luts, prev, CJK_SP) == 6
    assert count(stub_luts, THE, THE) == 3  # no leading space, nothing to add


def test_boundaries_and_ids_beyond_the_tokenizer_count_nothing(stub_luts):
    for target in (PAD, BOS, EOS, UNK, UNUSED, 13, 14, 15):
        for prev in (BOS, THE, UNK):
            assert count(stub_luts, prev, target) == 0


def test_token_bytes_is_elementwise(stub_luts):
    ids = torch.tensor([BOS, THE, THE_SP, UNK, THE_SP, LONE, EMOJI, BYTE_A, CJK_SP, EOS])
    assert token_bytes(stub_luts, ids[:-1], ids[1:]).tolist() == [3, 4, 0, 3, 1, 4, 1, 7, 0]


def test_a_space_inside_a_piece_counts_one_byte():
    """Tokenizers trained across whitespace have pieces like '▁of▁the', which print ' of the': the inner '▁'
    is a 1-byte space (the official tables count its 3 UTF-8 bytes)."""

    class InnerSpace(StubSP):
        PIECES = StubSP.PIECES + [f"{SPACE}of{SPACE}the"]

    luts = build_byte_luts(InnerSpace(), 16)
    assert count(luts, THE, 13) == len(" of the") and count(luts, BOS, 13) == len("of the")


# --- CaseOps: the byte sidecar -------------------------------------------------------------------------------


def test_caseops_sidecar_is_exact_on_every_document(sample_texts):
    """CaseOps val_bpb counts the sidecar's bytes (the tables would count the transformed text: each operator as
    3 bytes). On every sample document they sum to the UTF-8 length of the original text, and the trainer's
    byte count of the concatenated stream is the sum over its documents."""
    import caseops
    from conftest import CASEOPS

    from train_gpt import make_validation

    sp = spm.SentencePieceProcessor(model_file=str(CASEOPS))
    luts = build_byte_luts(sp, 8192)
    docs = [caseops.document_tokens(sp, text) for text in sample_texts]
    for text, (ids, counts) in zip(sample_texts, docs):
        assert sum(counts) == len(text.strip().encode("utf-8")), text[:80]
    assert sum(table_count(luts, ids[1:]) > sum(counts) for ids, counts in docs) > 350  # the tables over-count
    tokens = np.concatenate([ids for ids, _ in docs]).astype(np.uint16)
    sidecar = np.concatenate([counts for _, counts in docs]).astype(np.uint16)
    val = make_validation(tokens, luts, len(tokens) - 1, sidecar)
    assert val.byte_count == sum(len(t.strip().encode("utf-8")) for t in sample_texts)
    flat = tokens[sidecar == 0]
    assert set(np.unique(flat).tolist()) >= {1, 4, 5, 6}  # BOS and the operators count 0 bytes
