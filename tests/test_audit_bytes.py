"""data/audit_bytes.py: the byte-accounting audit on shards built from the sample, on deliberately broken
tables, on arbitrary token sequences, and through its command line."""

import json
from collections import Counter

import numpy as np
import pytest
import sentencepiece as spm
from conftest import SP1024, SP8192

import audit_bytes
from audit_bytes import audit, main
from build_shards import write_shard
from helpers import mark_piece_unused  # noqa: F401  (also test_config.py's import from here)
from train_gpt import ByteLUTs, build_byte_luts

SPACE = "\u2581"
BOS = 1


def shard_tokens(encoded: list[list[int]]) -> np.ndarray:
    return np.concatenate([[BOS] + ids for ids in encoded]).astype(np.uint16)


def rows(report: dict, cause: str) -> dict[int, tuple[int, int]]:
    """id -> (occurrences, bytes) of one cause in the per-token table."""
    return {r["id"]: (r["occurrences"], r["bytes"]) for r in report["by_token"] if r["cause"] == cause}


@pytest.fixture(scope="module", params=[(SP8192, 8192), (SP1024, 1024)], ids=["sp8192", "sp1024"])
def val(request, sample_texts, tmp_path_factory):
    """Tokenizer, tables, tokens and shard path of the sample's validation split (its first 100 documents)."""
    model, vocab = request.param
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tokens = shard_tokens(sp.encode(sample_texts[:100]))
    path = tmp_path_factory.mktemp("val") / f"fineweb_val_{vocab}.bin"
    write_shard(path, tokens)
    return sp, build_byte_luts(sp, vocab), tokens, path, model


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- real shards with the real tables ----------------------------------------------------------------------


def test_real_shard(val, capsys):
    sp, luts, tokens, path, model = val
    r = audit(sp, tokens, luts)
    assert r["documents"] == 100 and r["tokens"] == len(tokens) and r["tokens_before_first_bos"] == 0
    assert r["ok"]
    diff = r["canonical_bytes"] - r["table_bytes"]
    assert sum(c["bytes"] for c in r["causes"].values()) == diff
    assert sum(row["bytes"] for row in r["by_token"]) == diff
    if sp.vocab_size() == 8192:  # byte fallback: nothing to explain
        assert diff == 0 and r["causes"] == {} and r["differing_documents"] == 0 and r["ratio"] == 1.0
    else:  # no byte fallback: only <unk> and the leading space after it, each counted independently here
        unk, pieces = sp.unk_id(), [sp.id_to_piece(i) for i in range(sp.vocab_size())]
        after_unk = Counter(int(b) for a, b in zip(tokens[:-1], tokens[1:]) if a == unk and pieces[b][0] == SPACE)
        assert set(r["causes"]) == {"unk", "space_after_boundary"}
        assert rows(r, "unk") == {unk: (int((tokens == unk).sum()), int((tokens == unk).sum()) * 5)}  # " ⁇ "
        assert rows(r, "space_after_boundary") == {i: (n, n) for i, n in after_unk.items()}
        document = np.cumsum(tokens == BOS) - 1
        assert r["differing_documents"] == len(set(document[tokens == unk]))
    code, out, _ = cli(capsys, "--tokenizer", model, "--shard", path)
    assert code == 0 and "RESULT: OK" in out and f"table bytes {r['table_bytes']:,}" in out


# --- the classic bugs: the audit must catch deliberately broken tables ----------------------------------------


def broken(luts: ByteLUTs, bug: str, sp) -> ByteLUTs:
    base = luts.base_bytes.clone()
    if bug == "space counted twice":  # the leading "▁" kept in the base bytes as a space, plus the flag
        base += luts.has_leading_space.to(base.dtype)
    else:  # "byte pieces counted as 3 bytes": the length of U+FFFD (or the piece string) instead of one byte
        base[[i for i in range(sp.vocab_size()) if sp.is_byte(i)]] = 3
    return ByteLUTs(base, luts.has_leading_space, luts.is_boundary)


# Each bug on each tokenizer that has the pieces it miscounts: sp1024 has no byte pieces (no byte fallback), so the
# byte-piece bug runs on sp8192 only (the val fixture's tokenizer chosen per case, not a case that skips everywhere).
@pytest.mark.parametrize("val, bug", [((SP8192, 8192), "space counted twice"), ((SP1024, 1024), "space counted twice"),
                                      ((SP8192, 8192), "byte pieces counted as 3 bytes")], indirect=["val"],
                         ids=["space_twice-sp8192", "space_twice-sp1024", "byte_pieces-sp8192"])
def test_broken_tables_are_unexplained_at_the_right_ids(val, bug, capsys, monkeypatch):
    sp, luts, tokens, path, model = val
    bad = broken(luts, bug, sp)
    r = audit(sp, tokens, bad)
    assert not r["ok"]
    wrong = (bad.base_bytes != luts.base_bytes).numpy()[tokens]
    if bug == "space counted twice":  # after BOS or <unk> the tables add no space, so the extra byte stands in
        wrong &= np.r_[False, ~np.isin(tokens[:-1], [BOS, sp.unk_id()])]  # for the uncounted one: no difference
    per_occurrence = -1 if bug == "space counted twice" else -2
    expected = Counter(tokens[wrong].tolist())
    assert len(expected) > 50
    assert rows(r, "unexplained") == {i: (n, n * per_occurrence) for i, n in expected.items()}
    assert sum(c["bytes"] for c in r["causes"].values()) == r["canonical_bytes"] - r["table_bytes"]
    monkeypatch.setattr(audit_bytes, "build_byte_luts", lambda *a: bad)
    code, out, _ = cli(capsys, "--tokenizer", model, "--shard", path)
    assert code == 1 and "RESULT: FAIL (unexplained" in out


# --- hand-made and random token sequences ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp8192():
    sp = spm.SentencePieceProcessor(model_file=str(SP8192))
    return sp, build_byte_luts(sp, 8192)


def test_documented_causes_on_hand_made_documents(sp8192):
    sp, luts = sp8192
    a, b_sp, lone, eos, unk = (sp.piece_to_id(p) for p in ("a", f"{SPACE}b", SPACE, "</s>", "<unk>"))
    byte = {v: sp.piece_to_id(f"<0x{v:02X}>") for v in (0xE4, 0xB8, 0xE2, 0x96, 0x81)}
    # SentencePiece prints one U+FFFD per invalid byte (Python's errors="replace" would print one for E4 B8)
    assert sp.decode([a, byte[0xE4], byte[0xB8], b_sp]) == "a\ufffd\ufffd b"
    # a space spelled in byte pieces comes back as "▁", not as a space
    assert sp.decode([a, byte[0xE2], byte[0x96], byte[0x81], b_sp]) == f"a{SPACE} b"
    docs = [
        [a, byte[0xE4], byte[0xB8], b_sp],  # invalid UTF-8: +2 bytes for each of the two byte pieces
        [a, eos, b_sp],  # space printed after a control token in mid-document, not counted
        [a, unk, b_sp],  # <unk> prints " ⁇ " (5 bytes), then the uncounted space
        [lone, b_sp],  # a lone "▁" opening the document: the decoder drops both spaces, the tables count one
        [a, byte[0xE2], byte[0x96], byte[0x81], b_sp],  # a space spelled in bytes: 3 bytes for 1
        [],  # an empty document
    ]
    r = audit(sp, shard_tokens(docs), luts)
    assert r["documents"] == 6 and r["differing_documents"] == 4
    assert not r["ok"]  # every cause is documented, but a byte-spelled space flatters val_bpb: a failure
    assert rows(r, "invalid_utf8") == {byte[0xE4]: (1, 2), byte[0xB8]: (1, 2)}
    assert rows(r, "space_after_boundary") == {b_sp: (2, 2)}
    assert rows(r, "unk") == {unk: (1, 5)}
    assert rows(r, "space_at_document_start") == {b_sp: (1, -1)}
    assert rows(r, "byte_fallback_space") == {byte[0xE2]: (1, -2)}
    assert set(r["causes"]) == {"invalid_utf8", "space_after_boundary", "unk", "space_at_document_start",
                                "byte_fallback_space"}


@pytest.mark.parametrize("model", [SP8192, SP1024], ids=["sp8192", "sp1024"])
def test_decoder_emulation_matches_sp_decode_on_random_sequences(model):
    """Arbitrary ids (control, <unk>, byte pieces, lone "▁" included): the emulation agrees with sp.decode on
    every document, and the real tables differ from the decoder only for documented causes."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    rng = np.random.default_rng(0)
    special = [0, 2, 3, sp.piece_to_id(SPACE)] + [i for i in range(sp.vocab_size()) if sp.is_byte(i)][0x80:]
    docs = [[int(rng.choice(special)) if rng.random() < 0.5 else int(rng.integers(2, sp.vocab_size()))
             for _ in range(rng.integers(0, 12))] for _ in range(1500)]
    r = audit(sp, shard_tokens(docs), build_byte_luts(sp, sp.vocab_size()), chunk=1000)  # several chunks
    assert r["ok"], r["causes"]
    assert r["differing_documents"] > 500
    decoder_causes = {name: c for name, c in r["causes"].items() if name != "byte_fallback_space"}  # vs the text
    assert sum(c["bytes"] for c in decoder_causes.values()) == r["canonical_bytes"] - r["table_bytes"]


def test_tokens_before_the_first_bos_and_max_docs(sp8192):
    sp, luts = sp8192
    ids = sp.encode(["one document", "another one", "a third"])
    tokens = np.concatenate([ids[0][-2:]] + [shard_tokens(ids)]).astype(np.uint16)
    r = audit(sp, tokens, luts)
    assert r["tokens_before_first_bos"] == 2 and r["documents"] == 3 and r["tokens"] == len(tokens) - 2
    assert r["canonical_bytes"] == r["table_bytes"] == len("one documentanother onea third")
    r = audit(sp, tokens, luts, max_docs=2)
    assert r["documents"] == 2 and r["table_bytes"] == len("one documentanother one")


# --- a tokenizer without a lone "▁" piece -----------------------------------------------------------------


def test_tokenizer_without_a_lone_space_piece(sample_texts, tmp_path, capsys):
    """With byte fallback but no usable "▁" piece, a space that cannot merge with the next character is
    encoded as the byte pieces E2 96 81. The tables count 3 bytes, and so does sp.decode, because it prints
    "▁" rather than a space: the two agree, yet the text had a 1-byte space. The audit finds these by a scan
    and reports them as byte_fallback_space, 2 bytes over the text each, a failure (it flatters val_bpb)."""
    sp_ok = spm.SentencePieceProcessor(model_file=str(SP8192))
    lone = sp_ok.piece_to_id(SPACE)
    model = tmp_path / "no_lone_space.model"
    model.write_bytes(mark_piece_unused(SP8192.read_bytes(), lone))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.is_unused(lone) and sp.vocab_size() == 8192
    texts = sample_texts[:40]
    encoded, reference = sp.encode(texts), sp_ok.encode(texts)
    assert lone not in np.concatenate(encoded)
    spelled = [sp.piece_to_id(f"<0x{v:02X}>") for v in SPACE.encode("utf-8")]
    for ids, ref in zip(encoded, reference):  # exactly the lone "▁" pieces turn into the three byte pieces
        assert ids == [t for r in ref for t in (spelled if r == lone else [r])]
    n = sum(ref.count(lone) for ref in reference)
    tokens = shard_tokens(encoded)
    r = audit(sp, tokens, build_byte_luts(sp, 8192))
    assert not r["ok"] and r["differing_documents"] == 0
    text_bytes = sum(len(sp.normalize(t).replace(SPACE, " ").encode("utf-8")) for t in texts)
    assert r["table_bytes"] == r["canonical_bytes"] == text_bytes + 2 * n
    assert r["causes"] == {"byte_fallback_space": {"occurrences": n, "bytes": -2 * n}}
    write_shard(tmp_path / "val.bin", tokens)
    code, out, _ = cli(capsys, "--tokenizer", model, "--shard", tmp_path / "val.bin")
    assert code == 1 and "RESULT: FAIL (byte_fallback_space" in out


def test_pieces_with_inner_spaces_are_counted_as_printed(sample_texts, tmp_path):
    """A real tokenizer trained across whitespace (split_by_whitespace=False) has pieces such as '▁of▁the';
    the tables count their inner spaces as the decoder prints them, so no document differs."""
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sample_texts[100:160]), model_prefix=str(tmp_path / "ws"),
                                   model_type="bpe", vocab_size=700, split_by_whitespace=False, byte_fallback=True,
                                   add_dummy_prefix=False, max_sentence_length=1 << 20, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "ws.model"))
    tokens = shard_tokens(sp.encode(sample_texts[:30]))
    inner = [t for t in set(tokens.tolist()) if SPACE in sp.id_to_piece(t)[1:]]
    assert len(inner) > 10  # the property under test really occurs in this text
    r = audit(sp, tokens, build_byte_luts(sp, sp.vocab_size()))
    assert r["ok"] and r["differing_documents"] == 0 and r["table_bytes"] == r["canonical_bytes"]


# --- command line ---------------------------------------------------------------------------------------------


def test_json_output(val, capsys):
    sp, luts, tokens, path, model = val
    code, out, _ = cli(capsys, "--tokenizer", model, "--shard", path, "--json", "--max-docs", 50)
    report = json.loads(out)
    assert code == 0 and report["documents"] == 50 and report["shard"] == str(path)
    assert report["causes"] == audit(sp, tokens, luts, max_docs=50)["causes"]
    assert {"table_bytes", "canonical_bytes", "ratio", "differing_documents", "by_token", "ok"} <= set(report)


def test_bad_input_is_a_one_line_error(val, tmp_path, capsys):
    sp, luts, tokens, path, model = val
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(path.read_bytes()[:-3])
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a shard" * 200)
    fake_model = tmp_path / "fake.model"
    fake_model.write_text("not a model")
    no_bos = tmp_path / "no_bos.bin"
    write_shard(no_bos, tokens[tokens != BOS])
    other = SP1024 if model == SP8192 else SP8192
    cases = [
        (["--tokenizer", model, "--shard", truncated], str(truncated)),
        (["--tokenizer", model, "--shard", garbage], str(garbage)),
        (["--tokenizer", model, "--shard", tmp_path / "missing.bin"], "missing.bin"),
        (["--tokenizer", fake_model, "--shard", path], str(fake_model)),
        (["--tokenizer", tmp_path / "tok.txt", "--shard", path], "tok.txt"),
        (["--tokenizer", model, "--shard", path, "--vocab-size", 512], "--vocab-size 512"),
        (["--tokenizer", model, "--shard", path, "--max-docs", 0], "--max-docs 0"),
        (["--tokenizer", model, "--shard", no_bos], "no BOS"),
    ]
    if model == SP8192:  # sp8192 ids given to the 1024-piece tokenizer
        cases.append((["--tokenizer", other, "--shard", path], "token id"))
        cases.append((["--tokenizer", other, "--shard", path, "--vocab-size", 8192], "not in the tokenizer"))
    for args, needle in cases:
        code, out, err = cli(capsys, *args)
        assert code == 2 and out == "", args
        assert err.count("\n") == 1 and needle in err and err.startswith("audit_bytes: error:"), err


# --- CaseOps: the byte sidecar ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caseops_val(sample_texts, tmp_path_factory):
    """Shard, sidecar and input of the sample's validation split in CaseOps form (data/build_shards.py --caseops)."""
    from build_shards import build
    from conftest import CASEOPS, SAMPLE_JSONL

    out = tmp_path_factory.mktemp("caseops")
    build([SAMPLE_JSONL], out, CASEOPS, num_val_docs=100, allow_small_val=True, caseops_data=True, workers=2,
          log=lambda _: None)
    return out / "fineweb_val_000000.bin", out / "fineweb_val_bytes_000000.bin", CASEOPS


def test_caseops_sidecar_is_proved_on_every_document(caseops_val, sample_texts, capsys):
    from conftest import SAMPLE_JSONL

    shard, sidecar, model = caseops_val
    code, out, _ = cli(capsys, "--tokenizer", model, "--shard", shard, "--input", SAMPLE_JSONL, "--json")
    r = json.loads(out)
    assert code == 0 and r["ok"] and r["proved"] and r["documents"] == 100 and r["failures"] == {}
    assert r["sidecar_bytes"] == r["text_bytes"] == sum(len(t.strip().encode()) for t in sample_texts[:100])
    code, out, _ = cli(capsys, "--tokenizer", model, "--shard", shard)  # without the documents: structure only
    assert code == 0 and "OK (structural)" in out and "give --input" in out


@pytest.mark.parametrize("bug, failures", [
    ("one_more_byte", {"counts_differ", "bytes_differ"}),
    ("moved_byte", {"counts_differ"}),
    ("bos", {"bos_counts_bytes"}),
    ("operator", {"operator_counts_bytes", "counts_differ", "bytes_differ"}),
])
def test_caseops_audit_finds_broken_sidecars(caseops_val, sample_texts, bug, failures):
    import caseops

    from train_gpt import load_data_shard

    shard, sidecar, model = caseops_val
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tokens, counts = load_data_shard(str(shard)), load_data_shard(str(sidecar)).copy()
    doc = 7
    bos_at = np.flatnonzero(tokens == sp.bos_id())[doc]
    word = bos_at + 1 + next(k for k, c in enumerate(counts[bos_at + 1 :]) if c > 1)
    if bug == "one_more_byte":
        counts[word] += 1
    elif bug == "moved_byte":
        counts[word] -= 1
        counts[word + 1] += 1
    elif bug == "bos":
        counts[bos_at] = 1
    else:
        pieces = map(sp.id_to_piece, tokens[bos_at + 1 :].tolist())
        op = bos_at + 1 + next(k for k, p in enumerate(pieces) if p in caseops.OPERATORS)
        counts[op] = 1
    r = audit_bytes.audit_caseops(sp, tokens, counts, sample_texts[:100])
    assert not r["ok"] and set(r["failures"]) == failures and all(f["first"] == [doc] for f in r["failures"].values())


def test_caseops_audit_bad_input(caseops_val, tmp_path, capsys):
    shard, sidecar, model = caseops_val
    short = tmp_path / "fineweb_val_bytes_000000.bin"
    write_shard(short, np.zeros(5, np.uint16))
    code, _, err = cli(capsys, "--tokenizer", model, "--shard", shard, "--sidecar", short)
    assert code == 2 and "5 byte counts for" in err and "not its sidecar" in err
    code, _, err = cli(capsys, "--tokenizer", model, "--shard", shard, "--sidecar", tmp_path / "none.bin")
    assert code == 2 and "no such file" in err
