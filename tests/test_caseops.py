"""data/caseops.py: the CaseOps transform round-trips on real and adversarial text, and the byte sidecar's state
machine gives every document the UTF-8 length of its original text."""

import random

import pytest
import sentencepiece as spm
from conftest import CASEOPS

import caseops
from caseops import ALLCAPS, CAPNEXT, ESC, TITLE, CaseOpsError, decode, encode, piece_byte_counts

import train_gpt


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(CASEOPS))


@pytest.mark.parametrize("text, encoded", [
    ("", ""),
    ("hello world", "hello world"),
    ("Hello", TITLE + "hello"),
    ("I", TITLE + "i"),
    ("NASA", ALLCAPS + "nasa"),
    ("iPhone", "i" + CAPNEXT + "phone"),
    ("McDonald", TITLE + "mc" + CAPNEXT + "donald"),
    ("ABc", TITLE + "a" + CAPNEXT + "bc"),
    ("A1B2", TITLE + "a1" + TITLE + "b2"),  # digits end a run
    ("USA's", ALLCAPS + "usa's"),
    ("Élan École", "Élan École"),  # non-ASCII letters pass through, and end a run
    ("naïVE", "na" + "ï" + ALLCAPS + "ve"),
    ("x" + TITLE + "Y", "x" + ESC + TITLE + TITLE + "y"),  # a literal operator is escaped
    (ESC + ESC, ESC + ESC + ESC + ESC),
])
def test_encoding(text, encoded):
    assert encode(text) == encoded and decode(encoded) == text


def test_round_trip_on_every_sample_document(sample_texts):
    changed = 0
    for text in sample_texts:
        e = encode(text)
        assert decode(e) == text
        assert not any("A" <= c <= "Z" for c in e)  # every ASCII letter is spelled in lowercase
        changed += e != text
    assert changed > 300


ALPHABET = "aZbY09 .'-\n\t" + TITLE + ALLCAPS + CAPNEXT + ESC + "éÉßİıǅ中😀\u0301\ue000\ue005"


@pytest.mark.parametrize("seed", range(5))
def test_decode_inverts_encode_on_random_unicode(seed):
    rng = random.Random(seed)
    for _ in range(400):
        n = rng.randrange(30)
        if rng.random() < 0.5:
            text = "".join(rng.choice(ALPHABET) for _ in range(n))
        else:  # any code point except surrogates
            text = "".join(chr(rng.choice([rng.randrange(0xD800), rng.randrange(0xE000, 0x110000)])) for _ in range(n))
        assert decode(encode(text)) == text
        assert sum(piece_byte_counts([encode(text)])) == len(text.encode("utf-8"))


@pytest.mark.parametrize("bad", [TITLE, ALLCAPS + "1", CAPNEXT + " ", "a" + TITLE + "b", ESC, TITLE + ALLCAPS + "a",
                                 CAPNEXT + CAPNEXT + "a", TITLE + ESC + TITLE])
def test_decode_refuses_what_encode_cannot_produce(bad):
    with pytest.raises(CaseOpsError):
        decode(bad)


def test_byte_counts_split_across_pieces():
    # operators count 0, ESC 0 and the character it escapes (possibly in the next piece) its UTF-8 length
    assert piece_byte_counts([TITLE, "hello", " " + ESC, TITLE, "é"]) == [0, 5, 1, 3, 2]
    assert piece_byte_counts(["", ALLCAPS + "ab", CAPNEXT]) == [0, 2, 0]


def test_the_bundled_tokenizer_is_a_caseops_tokenizer(sp):
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(caseops.OPERATORS)
    assert train_gpt.data_variant(sp) == "caseops"
    assert all(sp.is_byte(i) for i in range(8, 264)) and (sp.pad_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert sp.encode(TITLE + "the", out_type=str)[0] == TITLE  # an operator is always a piece of its own


def test_document_bytes_are_the_original_text(sp, sample_texts):
    """Per document: the sidecar counts sum to the UTF-8 length of the original text (less the leading and
    trailing whitespace that SentencePiece drops), BOS counts 0, and the tokens decode, after the inverse
    transform, to the original text as the tokenizer normalises it."""
    for text in sample_texts[:150]:
        ids, counts = caseops.document_tokens(sp, text)
        assert ids[0] == sp.bos_id() and counts[0] == 0 and len(ids) == len(counts)
        assert sum(counts) == len(text.strip().encode("utf-8"))
        assert ids[1:] == sp.encode(encode(text))
        assert decode(sp.decode(ids[1:])) == sp.normalize(text).replace("\u2581", " ")
