"""Build token shards in the official format from a JSONL corpus ({"text": ...} per line).

    python3 data/build_shards.py --input docs.jsonl [--input more.jsonl ...] --output-dir DIR
        (--tokenizer X.model | --train-tokenizer --vocab-size N [--tokenizer-prefix P] [--tokenizer-train-docs K])
        [--caseops] [--num-val-docs 50000 [--allow-small-val]] [--shard-tokens 100000000] [--workers CPUS]
        [--overwrite]

Every document (one non-blank JSONL line; fields other than "text" are ignored) becomes [BOS] + sp.encode(text),
without EOS or padding. The first --num-val-docs documents form the validation split (fineweb_val_*.bin), all
later ones the training split (fineweb_train_*.bin). A shard holds --shard-tokens tokens exactly, except the
last shard of a split; documents run on across shard boundaries within a split, never across splits. The
canonical split has 50,000 validation documents; fewer need --allow-small-val (a sample or a test). A training
document whose text repeats a validation document is an error (PR #2127: a CaseOps prep script with a 10,000-doc
default put 80% of the scored documents in the training data).

--caseops writes the CaseOps data of the final records (data/caseops.py): every document is case-transformed
before it is encoded, the tokenizer must have the four operators at ids 4-7, and each validation shard gets a
byte sidecar fineweb_val_bytes_*.bin (same layout, one uint16 per token: the original UTF-8 bytes the token
accounts for, 0 for BOS), from which train_gpt.py counts the bytes of val_bpb.

--train-tokenizer first trains a SentencePiece BPE model with the official settings on training-split
documents only, so no validation text shapes the vocabulary. The inputs are checked from end to end before
any tokenizer training or encoding starts. The output is byte-identical whatever --workers is.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import caseops  # noqa: E402
from train_gpt import SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, data_variant  # noqa: E402

SPLITS = ("val", "train")  # file order: the first num_val_docs documents are the validation split
CANONICAL_VAL_DOCS = 50_000  # the challenge's validation split: the first 50,000 documents of docs_selected.jsonl
MAX_VOCAB = 65536  # shards store uint16 token ids
BATCH_DOCS = 64  # documents per worker task: large enough to amortise IPC, small enough to keep memory flat
# Official SentencePiece settings for the challenge tokenizers (vocab_size is added per run).
TOKENIZER_SETTINGS = dict(
    model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
    normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, hard_vocab_limit=False,
    pad_id=0, bos_id=1, eos_id=2, unk_id=3,
    # SentencePiece silently skips "sentences" longer than max_sentence_length (default 4192 bytes), which
    # would drop over a third of FineWeb documents (147 of the 400 sample ones); 2**30 is the largest value it
    # accepts, i.e. every document is kept.
    max_sentence_length=1 << 30,
)


class BuildError(ValueError):
    """Bad input or arguments, reported to the user as a one-line message."""


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write one shard atomically: 256 little-endian int32 (magic, version, token count), then uint16 tokens."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError(f"{path}: token ids must fit in uint16")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- input


def iter_documents(inputs: Iterable[str | os.PathLike]) -> Iterator[str]:
    """The "text" of every document of the input files, in order, streamed line by line. Blank lines are not
    documents (a trailing empty line is common in JSONL); any other defect is an error naming file and line."""
    for path in inputs:
        try:
            f = open(path, "rb")  # bytes, so that a decoding error is pinned to its line
        except OSError as e:
            raise BuildError(f"{path}: cannot read input ({e.strerror})") from None
        with f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    yield _parse_line(raw, path, lineno)


def _parse_line(raw: bytes, path, lineno: int) -> str:
    where = f"{path}:{lineno}"
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BuildError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BuildError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(record, dict) or "text" not in record:
        raise BuildError(f'{where}: expected a JSON object with a "text" field')
    if not isinstance(record["text"], str):
        raise BuildError(f'{where}: "text" must be a string, not {type(record["text"]).__name__}')
    return record["text"]


def doc_hash(text: str) -> bytes:
    return hashlib.blake2b(text.strip().encode("utf-8"), digest_size=16).digest()


def count_documents(inputs, num_val_docs: int = 0) -> int:
    """Validate every line of every input (a cheap pass that keeps bad data from failing an hour-long build
    half-way) and count the documents; a training document repeating a validation one (same text, up to
    surrounding whitespace, which tokenizes the same) is an error."""
    val, n = {}, 0
    for n, text in enumerate(iter_documents(inputs), 1):
        if n <= num_val_docs:
            val.setdefault(doc_hash(text), n)
        elif (first := val.get(doc_hash(text))) is not None:
            raise BuildError(f"document {n} (training split) repeats document {first} of the validation split "
                             f"(the first {num_val_docs}): the training shards must not hold validation text")
    return n


# ------------------------------------------------------------------------------------------------ tokenizer


def load_tokenizer(path: str | os.PathLike, caseops_data: bool | None = None) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model usable for shards: loadable, a BOS piece, ids that fit in uint16, and (unless
    caseops_data is None) operator pieces exactly when the data is CaseOps."""
    if not Path(path).is_file():
        raise BuildError(f"{path}: tokenizer model not found")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise BuildError(f"{path}: not a loadable SentencePiece model ({e})") from None
    if sp.bos_id() < 0:
        raise BuildError(f"{path}: the tokenizer has no BOS piece, needed to mark document starts")
    if sp.get_piece_size() > MAX_VOCAB:
        raise BuildError(f"{path}: {sp.get_piece_size()} pieces do not fit the uint16 shards (max {MAX_VOCAB})")
    if caseops_data is not None and caseops_data != (data_variant(sp) == "caseops"):
        raise BuildError(f"{path}: --caseops needs a CaseOps tokenizer (the operators U+E001-U+E004 at ids 4-7)"
                         if caseops_data else f"{path}: a CaseOps tokenizer (operators at ids 4-7) expects "
                         "case-transformed text: pass --caseops")
    return sp


def tokenizer_training_texts(inputs, num_val_docs: int, max_docs: int | None = None,
                             transform: Callable[[str], str] | None = None) -> Iterator[str]:
    """Texts the tokenizer is trained on: training-split documents only (skipping the first num_val_docs,
    so that validation text never leaks into the vocabulary), transformed (CaseOps), NULs replaced by spaces
    (SentencePiece treats NUL as an end of string), whitespace stripped, empty texts skipped; at most max_docs."""
    docs = itertools.islice(iter_documents(inputs), num_val_docs, None)
    docs = map(transform, docs) if transform else docs
    texts = (t for t in (d.replace("\0", " ").strip() for d in docs) if t)
    return itertools.islice(texts, max_docs)


def train_tokenizer(inputs, num_val_docs: int, vocab_size: int, prefix: str | os.PathLike,
                    max_docs: int | None = None, threads: int = 1, caseops_data: bool = False) -> Path:
    """Train a SentencePiece BPE model with the official settings (CaseOps: on transformed text, the four
    operators as user-defined pieces, ids 4-7, as in the records); return the path of <prefix>.model."""
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    extra = caseops.TOKENIZER_SETTINGS if caseops_data else {}
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=tokenizer_training_texts(inputs, num_val_docs, max_docs,
                                                       caseops.encode if caseops_data else None),
            model_prefix=str(prefix), vocab_size=vocab_size, num_threads=threads,
            minloglevel=1, **TOKENIZER_SETTINGS, **extra)  # minloglevel=1: warnings only, not every merge
    except RuntimeError as e:
        raise BuildError(f"SentencePiece training failed: {e}") from None
    return Path(f"{prefix}.model")


# ------------------------------------------------------------------------------------------------- encoding

_worker_sp: spm.SentencePieceProcessor | None = None  # one model per worker process, loaded once
_worker_caseops = False


def _load_worker_model(model_path: str, caseops_data: bool = False) -> None:
    global _worker_sp, _worker_caseops
    _worker_sp, _worker_caseops = spm.SentencePieceProcessor(model_file=model_path), caseops_data


def _concat(lists: list[list[int]]) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(lists), np.uint16, sum(map(len, lists)))


def _encode_batch(batch: tuple[str, list[str]]) -> tuple[str, int, np.ndarray, np.ndarray | None]:
    """(split, texts) -> (split, number of documents, [BOS] + ids of every text, concatenated, and for CaseOps
    the original bytes of every token, else None). One thread per encode call: the parallelism comes from the
    worker processes."""
    split, texts = batch
    if not _worker_caseops:
        return split, len(texts), _concat(_worker_sp.encode(texts, add_bos=True, add_eos=False, num_threads=1)), None
    docs = [caseops.document_tokens(_worker_sp, t) for t in texts]
    counts = [c for _, c in docs]
    if max(map(max, counts)) > 65535:
        raise BuildError(f"a {split} token accounts for {max(map(max, counts))} bytes, more than the uint16 sidecar "
                         "holds")
    return split, len(texts), _concat([ids for ids, _ in docs]), _concat(counts)


def encode_batches(batches: Iterable[tuple[str, list[str]]], model_path: str, workers: int,
                   caseops_data: bool = False) -> Iterator[tuple]:
    """Encoded batches (see _encode_batch), in input order, with at most 2 tasks per worker in flight, so that
    memory stays flat however large the corpus: Pool.imap has no such bound (its feeder thread reads ahead, and
    results wait in memory without limit whenever the shard writing falls behind)."""
    if workers == 1:
        _load_worker_model(model_path, caseops_data)
        yield from map(_encode_batch, batches)
        return
    with multiprocessing.Pool(workers, initializer=_load_worker_model, initargs=(model_path, caseops_data)) as pool:
        pending = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _batches(docs: Iterator[str], num_val_docs: int) -> Iterator[tuple[str, list[str]]]:
    """(split, texts) batches that never straddle the validation/training boundary."""
    for split, part in (("val", itertools.islice(docs, num_val_docs)), ("train", docs)):
        while batch := list(itertools.islice(part, BATCH_DOCS)):
            yield split, batch


# --------------------------------------------------------------------------------------------------- shards


class ShardWriter:
    """Fill shards of one split front to back: each one exactly full, except the last."""

    def __init__(self, output_dir: Path, split: str, shard_tokens: int, log: Callable[[str], None]):
        self.output_dir, self.split, self.log = output_dir, split, log
        self.buf, self.fill = np.empty(shard_tokens, dtype=np.uint16), 0  # np.empty: pages touched on use
        self.shards: list[str] = []
        self.docs = self.tokens = 0

    def add(self, tokens: np.ndarray, docs: int) -> None:
        self.docs, self.tokens = self.docs + docs, self.tokens + tokens.size
        while tokens.size:
            k = min(tokens.size, self.buf.size - self.fill)
            self.buf[self.fill : self.fill + k] = tokens[:k]
            self.fill, tokens = self.fill + k, tokens[k:]
            if self.fill == self.buf.size:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            name = f"fineweb_{self.split}_{len(self.shards):06d}.bin"
            write_shard(self.output_dir / name, self.buf[: self.fill])
            self.log(f"wrote {name}: {self.fill:,} tokens")
            self.shards.append(name)
            self.fill = 0


def existing_shards(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob("fineweb_*.bin"))


def remove_old_shards(output_dir: Path) -> None:
    """Delete shards of an earlier build (and temporaries of an interrupted one): a stale
    fineweb_train_000009.bin left beside a new 3-shard build would silently join the training data."""
    for path in existing_shards(output_dir) + list(output_dir.glob("fineweb_*.bin.tmp*")):
        path.unlink()


# ---------------------------------------------------------------------------------------------------- build


def _check_args(inputs, tokenizer, train_vocab_size, num_val_docs, shard_tokens, workers, tokenizer_train_docs,
                allow_small_val):
    if not inputs:
        raise BuildError("no input files")
    if (tokenizer is None) == (train_vocab_size is None):
        raise BuildError("give exactly one of a tokenizer model or a vocabulary size to train one")
    if train_vocab_size is not None and not 0 < train_vocab_size <= MAX_VOCAB:
        raise BuildError(f"vocab size {train_vocab_size} does not fit the uint16 shards (1..{MAX_VOCAB})")
    for name, value in (("num_val_docs", num_val_docs), ("shard_tokens", shard_tokens), ("workers", workers)):
        if value < 1:
            raise BuildError(f"{name} must be at least 1, got {value}")
    if tokenizer_train_docs is not None and tokenizer_train_docs < 1:
        raise BuildError(f"tokenizer_train_docs must be at least 1, got {tokenizer_train_docs}")
    if num_val_docs < CANONICAL_VAL_DOCS and not allow_small_val:
        raise BuildError(f"num_val_docs={num_val_docs}: the challenge's validation split is the first "
                         f"{CANONICAL_VAL_DOCS:,} documents; a smaller one (a sample, a test) needs --allow-small-val")


def build(inputs: Iterable[str | os.PathLike], output_dir: str | os.PathLike,
          tokenizer: str | os.PathLike | None = None,
          *, train_vocab_size: int | None = None, tokenizer_prefix: str | os.PathLike | None = None,
          tokenizer_train_docs: int | None = None, num_val_docs: int = CANONICAL_VAL_DOCS,
          allow_small_val: bool = False, caseops_data: bool = False, shard_tokens: int = 10**8,
          workers: int | None = None, overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Build the shards; return the summary {"tokenizer", "vocab_size", "documents", "seconds",
    "splits": {"val"|"train": {"docs", "tokens", "shards": [file names]}}, "sidecar": None or, for CaseOps,
    {"bytes": original bytes of the validation split, "shards": [file names]}}. Give either `tokenizer` (a
    SentencePiece .model) or `train_vocab_size` (train one at tokenizer_prefix, default
    <output_dir>/fineweb_<N>_bpe[_caseops], on at most tokenizer_train_docs training documents, default all)."""
    t0, inputs, output_dir = time.perf_counter(), [str(p) for p in inputs], Path(output_dir)
    workers = (os.cpu_count() or 1) if workers is None else workers
    _check_args(inputs, tokenizer, train_vocab_size, num_val_docs, shard_tokens, workers, tokenizer_train_docs,
                allow_small_val)
    # Cheap checks first, so that no mistake surfaces after the expensive work.
    if existing_shards(output_dir) and not overwrite:
        raise BuildError(f"{output_dir} already holds fineweb_*.bin shards; pass --overwrite to replace them")
    if tokenizer is not None:
        load_tokenizer(tokenizer, caseops_data)
    documents = count_documents(inputs, num_val_docs)
    if documents <= num_val_docs:
        raise BuildError(f"the inputs hold {documents} documents, but the first {num_val_docs} are the validation "
                         "split: no training documents left (lower --num-val-docs)")

    if train_vocab_size is not None:
        prefix = tokenizer_prefix or output_dir / f"fineweb_{train_vocab_size}_bpe{'_caseops' * caseops_data}"
        log(f"training a {train_vocab_size}-piece BPE tokenizer on training documents -> {prefix}.model")
        tokenizer = train_tokenizer(inputs, num_val_docs, train_vocab_size, prefix, tokenizer_train_docs, workers,
                                    caseops_data)
    vocab_size = load_tokenizer(tokenizer, caseops_data).get_piece_size()

    output_dir.mkdir(parents=True, exist_ok=True)
    remove_old_shards(output_dir)
    writers = {s: ShardWriter(output_dir, s, shard_tokens, log) for s in SPLITS + ("val_bytes",) * caseops_data}
    batches, original_bytes = _batches(iter_documents(inputs), num_val_docs), 0
    for split, docs, tokens, counts in encode_batches(batches, str(tokenizer), workers, caseops_data):
        if split == "train":
            for w in writers.values():  # the validation split is complete: write its last shards now
                if w.split != "train":
                    w.flush()
        writers[split].add(tokens, docs)
        if counts is not None and split == "val":
            writers["val_bytes"].add(counts, docs)
            original_bytes += int(counts.sum(dtype=np.int64))
    for w in writers.values():
        w.flush()
    sidecar = writers.pop("val_bytes", None)
    return dict(tokenizer=str(tokenizer), vocab_size=vocab_size, documents=documents,
                seconds=round(time.perf_counter() - t0, 2),
                splits={s: dict(docs=w.docs, tokens=w.tokens, shards=w.shards) for s, w in writers.items()},
                sidecar=sidecar and dict(bytes=original_bytes, shards=sidecar.shards))


def format_summary(summary: dict) -> str:
    lines = [f"tokenizer: {summary['tokenizer']} ({summary['vocab_size']} pieces)"]
    for split, s in summary["splits"].items():
        lines.append(f"{split}: {s['docs']:,} documents, {s['tokens']:,} tokens in {len(s['shards'])} shard(s)")
    if summary["sidecar"]:
        lines.append(f"val byte sidecar: {summary['sidecar']['bytes']:,} original bytes in "
                     f"{len(summary['sidecar']['shards'])} shard(s)")
    lines.append(f"done in {summary['seconds']:.1f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="extend", nargs="+", required=True, metavar="JSONL",
                   help="JSONL corpus, one {\"text\": ...} per line; repeat to concatenate files in order")
    p.add_argument("--output-dir", required=True)
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="MODEL", help="an existing SentencePiece .model")
    tok.add_argument("--train-tokenizer", action="store_true", help="train a BPE tokenizer first (--vocab-size)")
    p.add_argument("--vocab-size", type=int, help="vocabulary size of the trained tokenizer (<= 65536)")
    p.add_argument("--tokenizer-prefix", help="output prefix of the trained tokenizer "
                                              "(default: OUTPUT_DIR/fineweb_<vocab-size>_bpe)")
    p.add_argument("--tokenizer-train-docs", type=int, help="train the tokenizer on at most this many "
                                                            "training documents (default: all)")
    p.add_argument("--caseops", action="store_true", help="CaseOps data: case-transformed text, a CaseOps tokenizer "
                                                          "and the validation byte sidecar (data/caseops.py)")
    p.add_argument("--num-val-docs", type=int, default=CANONICAL_VAL_DOCS,
                   help=f"leading documents forming the validation split (default {CANONICAL_VAL_DOCS:,})")
    p.add_argument("--allow-small-val", action="store_true", help="allow fewer validation documents than the "
                                                                  "canonical 50,000 (samples, tests)")
    p.add_argument("--shard-tokens", type=int, default=10**8, help="tokens per shard (the last one of a split: fewer)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="encoding processes (default: CPU count)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards already in OUTPUT_DIR")
    a = p.parse_args(argv)
    if a.train_tokenizer != (a.vocab_size is not None):
        p.error("--vocab-size goes with --train-tokenizer (and is required by it)")
    if a.tokenizer_prefix and not a.train_tokenizer:
        p.error("--tokenizer-prefix goes with --train-tokenizer")
    try:
        summary = build(a.input, a.output_dir, a.tokenizer, train_vocab_size=a.vocab_size,
                        tokenizer_prefix=a.tokenizer_prefix, tokenizer_train_docs=a.tokenizer_train_docs,
                        num_val_docs=a.num_val_docs, allow_small_val=a.allow_small_val, caseops_data=a.caseops,
                        shard_tokens=a.shard_tokens, workers=a.workers,
                        overwrite=a.overwrite)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
