"""data/build_shards.py: shard format, split layout, shard boundaries, worker independence, input errors and
tokenizer training (official settings, training documents only)."""

import json

import numpy as np
import pytest
import sentencepiece as spm
from conftest import SAMPLE_JSONL, SP1024

import build_shards
from build_shards import BuildError, build, main, tokenizer_training_texts, write_shard
from train_gpt import SHARD_HEADER_BYTES, load_data_shard, read_shard_header

MARKER = "Qwzx"  # a word no sample document contains


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(SP1024))


def write_jsonl(path, texts, **extra):
    path.write_text("".join(json.dumps({"text": t, **extra}) + "\n" for t in texts), encoding="utf-8")
    return path


def split_tokens(out, split) -> tuple[list[np.ndarray], np.ndarray]:
    """The shards of one split, in order (checking they are numbered 0, 1, ...), and their concatenation."""
    files = sorted(out.glob(f"fineweb_{split}_[0-9]*.bin"))
    assert [f.name for f in files] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(files))]
    shards = [load_data_shard(str(f)) for f in files]
    return shards, np.concatenate(shards)


def expected(sp, texts) -> np.ndarray:
    return np.array([t for text in texts for t in [sp.bos_id()] + sp.encode(text)], dtype=np.uint16)


def test_write_shard_header_and_round_trip(tmp_path):
    tokens = np.array([1, 65535, 0, 42, 1023], dtype=np.uint16)
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == SHARD_HEADER_BYTES + 2 * len(tokens) == 1024 + 10
    assert raw[:12] == (20240520).to_bytes(4, "little") + (1).to_bytes(4, "little") + (5).to_bytes(4, "little")
    assert raw[12:1024] == bytes(1012)
    assert raw[1024:] == b"".join(int(t).to_bytes(2, "little") for t in tokens)
    assert read_shard_header(str(path)) == 5 and np.array_equal(load_data_shard(str(path)), tokens)
    write_shard(path, np.array([], dtype=np.uint16))  # replaces the file atomically, leaving no temporary
    assert read_shard_header(str(path)) == 0 and [p.name for p in tmp_path.iterdir()] == [path.name]
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "bad.bin", np.array([65536]))


def test_splits_are_bos_plus_encoded_documents_in_order(tmp_path, sp, sample_texts):
    # extra fields are ignored, blank lines are not documents, an empty text is still a document ([BOS] alone)
    texts = sample_texts[:12] + [""] + sample_texts[100:130]
    corpus = write_jsonl(tmp_path / "c.jsonl", texts, id="x", score=0.5)
    corpus.write_text(corpus.read_text() + "\n  \n")
    summary = build([corpus], tmp_path / "out", SP1024, num_val_docs=12, allow_small_val=True, workers=1,
                    log=lambda _: None)
    for split, docs in (("val", texts[:12]), ("train", texts[12:])):
        _, tokens = split_tokens(tmp_path / "out", split)
        assert np.array_equal(tokens, expected(sp, docs))
        assert (tokens == sp.bos_id()).sum() == len(docs) and not (tokens == sp.eos_id()).any()
        assert summary["splits"][split]["docs"] == len(docs) and summary["splits"][split]["tokens"] == len(tokens)
    assert summary["documents"] == len(texts) and summary["vocab_size"] == 1024


@pytest.mark.parametrize("shard_tokens", [3000, "val_total"])
def test_shards_are_full_except_the_last_of_each_split(tmp_path, sp, sample_texts, shard_tokens):
    texts = sample_texts[:10] + sample_texts[100:120]
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    val_total = len(expected(sp, texts[:10]))
    cap = val_total if shard_tokens == "val_total" else shard_tokens  # the val split ends exactly on a boundary
    build([corpus], tmp_path / "out", SP1024, num_val_docs=10, allow_small_val=True, shard_tokens=cap, workers=1,
          log=lambda _: None)
    for split, docs in (("val", texts[:10]), ("train", texts[10:])):
        shards, tokens = split_tokens(tmp_path / "out", split)
        assert all(len(s) == cap for s in shards[:-1]) and 0 < len(shards[-1]) <= cap
        assert len(shards) == -(-len(tokens) // cap)  # no empty trailing shard
        # each split starts a new shard: its first shard begins with its own first document
        assert np.array_equal(tokens, expected(sp, docs)) and shards[0][0] == sp.bos_id()
    assert len(split_tokens(tmp_path / "out", "val")[0]) == (1 if shard_tokens == "val_total" else 3)


def test_output_is_identical_for_any_worker_count_and_input_split(tmp_path, sample_texts, monkeypatch):
    monkeypatch.setattr(build_shards, "BATCH_DOCS", 7)  # many batches in flight, one straddling the split change
    halves = [write_jsonl(tmp_path / "a.jsonl", sample_texts[:150]),
              write_jsonl(tmp_path / "b.jsonl", sample_texts[150:])]
    kw = dict(num_val_docs=100, allow_small_val=True, shard_tokens=50_000, log=lambda _: None)
    build([SAMPLE_JSONL], tmp_path / "w1", SP1024, workers=1, **kw)
    build([SAMPLE_JSONL], tmp_path / "w2", SP1024, workers=2, **kw)
    build(halves, tmp_path / "halves", SP1024, workers=2, **kw)  # several inputs are concatenated in order
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert len(names) > 4 and "fineweb_val_000000.bin" in names
    for other in ("w2", "halves"):
        assert sorted(p.name for p in (tmp_path / other).iterdir()) == names
        assert all((tmp_path / "w1" / n).read_bytes() == (tmp_path / other / n).read_bytes() for n in names)


@pytest.mark.parametrize("line, message", [
    ('{"text": "fine"', r"invalid JSON"),
    ('["text"]', r'expected a JSON object with a "text" field'),
    ('{"body": "no text"}', r'expected a JSON object with a "text" field'),
    ('{"text": null}', r'"text" must be a string, not NoneType'),
    ('{"text": 3}', r'"text" must be a string, not int'),
])
def test_bad_input_line_is_reported_with_file_and_line_before_any_output(tmp_path, sample_texts, line, message):
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_texts[:5])
    corpus.write_text(corpus.read_text() + line + "\n")  # line 6, after good documents
    with pytest.raises(BuildError, match=rf"c\.jsonl:6: {message}"):
        build([corpus], tmp_path / "out", SP1024, num_val_docs=2, allow_small_val=True, workers=1)
    assert not (tmp_path / "out").exists()


def test_bad_arguments_and_tokenizers(tmp_path, sample_texts):
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_texts[:5])
    out = tmp_path / "out"
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    no_bos = tmp_path / "nobos"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sample_texts[:20]), model_prefix=str(no_bos),
                                   vocab_size=200, bos_id=-1, minloglevel=2)
    cases = [
        (dict(inputs=[tmp_path / "missing.jsonl"]), r"missing\.jsonl: cannot read input"),
        (dict(tokenizer=tmp_path / "missing.model"), r"missing\.model: tokenizer model not found"),
        (dict(tokenizer=garbage), r"garbage\.model: not a loadable SentencePiece model"),
        (dict(tokenizer=f"{no_bos}.model"), r"nobos\.model: the tokenizer has no BOS piece"),
        (dict(num_val_docs=5), r"5 documents.*no training documents left"),
        (dict(tokenizer=None, train_vocab_size=70_000), r"vocab size 70000 does not fit"),
        (dict(shard_tokens=0), r"shard_tokens must be at least 1"),
    ]
    for overrides, message in cases:
        kw = dict(inputs=[corpus], output_dir=out, tokenizer=SP1024, num_val_docs=2, allow_small_val=True,
                  workers=1) | overrides
        with pytest.raises(BuildError, match=message):
            build(**kw)
    assert not out.exists()


def test_existing_shards_are_kept_unless_overwrite_which_removes_stale_ones(tmp_path, sample_texts, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_texts[:20])
    out = tmp_path / "out"
    args = ["--input", str(corpus), "--tokenizer", str(SP1024), "--output-dir", str(out), "--num-val-docs", "5",
            "--allow-small-val", "--workers", "1"]
    assert main(args + ["--shard-tokens", "2000"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) > 4
    (out / "fineweb_train_000000.bin.tmp123").write_bytes(b"interrupted")
    assert main(args) == 2
    assert "already holds fineweb_*.bin shards; pass --overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".bin"} == before
    assert main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    printed = capsys.readouterr().out
    assert "val: 5 documents" in printed and "train: 15 documents" in printed and str(SP1024) in printed


def test_tokenizer_training_texts_are_cleaned_training_documents_only(tmp_path):
    texts = ["val one", "val two", " train\0one \n", "", "  \t", "train two", "train three"]
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    assert list(tokenizer_training_texts([corpus], 2)) == ["train one", "train two", "train three"]
    assert list(tokenizer_training_texts([corpus], 2, max_docs=2)) == ["train one", "train two"]


def test_train_tokenizer_official_settings_on_training_documents_only(tmp_path, sample_texts, capsys):
    # The marker fills the validation documents; a control build has it only in one long (> 4192 bytes,
    # SentencePiece's default max_sentence_length) training document, where it must be learned.
    marker = (" " + MARKER) * 250
    val, train = [t + marker for t in sample_texts[:20]], sample_texts[100:230]
    leak = write_jsonl(tmp_path / "leak.jsonl", val + train)
    control = write_jsonl(tmp_path / "control.jsonl", sample_texts[:20] + [train[0] + marker * 20] + train[1:])
    base = ["--train-tokenizer", "--vocab-size", "400", "--num-val-docs", "20", "--allow-small-val", "--workers", "2"]
    assert main(base + ["--input", str(leak), "--output-dir", str(tmp_path / "out")]) == 0
    assert main(base + ["--input", str(control), "--output-dir", str(tmp_path / "ctl"),
                        "--tokenizer-prefix", str(tmp_path / "ctl_tok")]) == 0
    assert "fineweb_400_bpe.model (400 pieces)" in capsys.readouterr().out

    model = tmp_path / "out" / "fineweb_400_bpe.model"
    assert model.is_file() and model.with_suffix(".vocab").is_file()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    ctl = spm.SentencePieceProcessor(model_file=str(tmp_path / "ctl_tok.model"))
    assert sp.piece_to_id("\u2581" + MARKER) == sp.unk_id()  # never saw the validation text
    assert ctl.piece_to_id("\u2581" + MARKER) != ctl.unk_id()  # the test can see a leak; long documents count
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in range(sp.get_piece_size())) == 256  # byte_fallback
    assert sp.encode("\u4e16", out_type=str) == ["<0xE4>", "<0xB8>", "<0x96>"]  # unseen character -> bytes
    assert sp.encode("2024 and 31337", out_type=str)[:4] == ["2", "0", "2", "4"]  # split_digits
    assert not any(p.strip("\u2581").isdigit() and len(p.strip("\u2581")) > 1
                   for p in map(sp.id_to_piece, range(sp.get_piece_size())))
    # the shards were encoded with the new tokenizer
    _, tokens = split_tokens(tmp_path / "out", "val")
    assert np.array_equal(tokens, expected(sp, val))


# --- the canonical split, overlap, CaseOps ----------------------------------------------------------------


def test_small_validation_split_needs_an_explicit_flag(tmp_path, sample_texts, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_texts[:20])
    with pytest.raises(BuildError, match=r"num_val_docs=5: the challenge's validation split is the first 50,000 "
                                         r"documents.*--allow-small-val"):
        build([corpus], tmp_path / "out", SP1024, num_val_docs=5, workers=1)
    args = ["--input", str(corpus), "--tokenizer", str(SP1024), "--output-dir", str(tmp_path / "out")]
    assert main(args) == 2 and "the first 50000 are the validation split" in capsys.readouterr().err  # default
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("repeat", ["same", "whitespace"])
def test_refuses_training_documents_that_repeat_validation_documents(tmp_path, sample_texts, repeat):
    leaked = sample_texts[3] if repeat == "same" else "\n " + sample_texts[3] + "  "
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_texts[:10] + sample_texts[100:110] + [leaked])
    with pytest.raises(BuildError, match=r"document 21 \(training split\) repeats document 4 of the validation split"):
        build([corpus], tmp_path / "out", SP1024, num_val_docs=10, allow_small_val=True, workers=1)
    assert not (tmp_path / "out").exists()
    # a validation split with a repeated document of its own is fine (FineWeb has near-duplicates)
    ok = write_jsonl(tmp_path / "ok.jsonl", sample_texts[:10] + [sample_texts[3]] + sample_texts[100:110])
    build([ok], tmp_path / "ok", SP1024, num_val_docs=11, allow_small_val=True, workers=1, log=lambda _: None)


def test_caseops_shards_and_byte_sidecar(tmp_path, sample_texts):
    from conftest import CASEOPS

    import caseops

    sp = spm.SentencePieceProcessor(model_file=str(CASEOPS))
    texts = sample_texts[:30] + sample_texts[100:130]
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    summary = build([corpus], tmp_path / "out", CASEOPS, num_val_docs=30, allow_small_val=True, caseops_data=True,
                    shard_tokens=20_000, workers=2, log=lambda _: None)
    docs = [caseops.document_tokens(sp, t) for t in texts]
    for split, part in (("val", docs[:30]), ("train", docs[30:])):
        _, tokens = split_tokens(tmp_path / "out", split)
        assert tokens.tolist() == [i for ids, _ in part for i in ids]
    shards, counts = split_tokens(tmp_path / "out", "val_bytes")
    assert [len(s) for s in shards] == [len(s) for s in split_tokens(tmp_path / "out", "val")[0]]  # one per token
    assert counts.tolist() == [c for _, cs in docs[:30] for c in cs]
    assert counts.sum() == summary["sidecar"]["bytes"] == sum(len(t.strip().encode()) for t in texts[:30])
    assert not list((tmp_path / "out").glob("fineweb_train_bytes_*"))  # the sidecar is for scoring only


def test_caseops_tokenizer_and_data_must_agree(tmp_path, sample_texts):
    from conftest import CASEOPS

    corpus = write_jsonl(tmp_path / "c.jsonl", sample_texts[:10])
    kw = dict(num_val_docs=2, allow_small_val=True, workers=1)
    with pytest.raises(BuildError, match=r"--caseops needs a CaseOps tokenizer"):
        build([corpus], tmp_path / "out", SP1024, caseops_data=True, **kw)
    with pytest.raises(BuildError, match=r"a CaseOps tokenizer .* expects case-transformed text: pass --caseops"):
        build([corpus], tmp_path / "out", CASEOPS, **kw)


def test_caseops_tokenizer_training(tmp_path, sample_texts):
    import caseops

    corpus = write_jsonl(tmp_path / "c.jsonl", sample_texts[:5] + sample_texts[100:160])
    summary = build([corpus], tmp_path / "out", train_vocab_size=500, num_val_docs=5, allow_small_val=True,
                    caseops_data=True, workers=2, log=lambda _: None)
    assert summary["tokenizer"].endswith("fineweb_500_bpe_caseops.model")
    sp = spm.SentencePieceProcessor(model_file=summary["tokenizer"])
    assert [sp.id_to_piece(i) for i in range(8)] == ["<pad>", "<s>", "</s>", "<unk>", *caseops.OPERATORS]
    assert all(sp.is_byte(i) for i in range(8, 264))  # ids 8-263: the byte pieces, as in the records
    assert summary["sidecar"]["bytes"] == sum(len(t.strip().encode()) for t in sample_texts[:5])
