"""Audit the byte accounting of val_bpb on a token shard: prove that train_gpt's byte tables count what the
tokens stand for, and explain every difference.

    python data/audit_bytes.py --tokenizer X.model --shard fineweb_val_000000.bin [--vocab-size V]
                               [--max-docs N] [--json] [--sidecar fineweb_val_bytes_000000.bin] [--input docs.jsonl]

The shard is split into documents at BOS tokens. For each document the table count (train_gpt.token_bytes
summed over its tokens, the first one preceded by BOS) is compared with the canonical count, the UTF-8 length
of sp.decode(document ids). Table counts are vectorised over the whole shard (per-document sums from a
cumulative sum); only the documents whose counts differ go through an emulation of SentencePiece's decoder,
token by token (vectorised too), which attributes each difference to a token id and a cause (CAUSES) and must
add up to sp.decode's count. A space spelled in byte pieces is found by a separate scan, since there the
tables and sp.decode agree with each other but not with the text. Run it whenever the tokenizer changes.

A CaseOps tokenizer (operators at ids 4-7) is scored on its byte sidecar, not on the tables, so its audit
(audit_caseops) checks the sidecar (default: fineweb_val_bytes_N.bin beside the shard): BOS counts 0, a token
that is only an operator counts 0, every document decodes and inverts to valid text. With --input (the JSONL the
shards were built from, validation documents first) it proves each document: its tokens are those of the
transformed text, the sidecar has the count of every token, the counts sum to the UTF-8 length of the original
text (less the leading and trailing whitespace SentencePiece drops), and decoding the tokens and inverting the
transform gives the original text as the tokenizer normalises it.

Exit code: 0 when every difference has a documented cause, 1 when some difference is unexplained (a bug in
the tables) or the emulation disagrees with sp.decode, 2 on bad input.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import caseops  # noqa: E402
from build_shards import BuildError, iter_documents  # noqa: E402
from train_gpt import ByteLUTs, build_byte_luts, data_variant, load_data_shard, sidecar_path, token_bytes  # noqa: E402

SPACE = "\u2581"
REPLACEMENT_BYTES = 3  # U+FFFD, printed by SentencePiece for every byte that is not part of valid UTF-8
CAUSES = {  # cause -> meaning; its "bytes" = canonical - table: + the tables miss bytes, - they over-count
    "unk": "<unk>: 0 bytes in the tables, the decoder prints its surface (the unknown text itself is lost)",
    "space_after_boundary": "leading space after a boundary (<unk>, control, unused) in mid-document: "
                            "printed by the decoder, not counted by the tables",
    "space_at_document_start": "leading space after pieces that printed nothing (a lone '\u2581' opening the "
                               "document): dropped by the decoder, counted by the tables; sp.encode never "
                               "produces this (the normaliser strips leading spaces)",
    "invalid_utf8": "byte piece that is not part of valid UTF-8: 1 byte in the tables, U+FFFD (3) in the decoder",
    "byte_fallback_space": "a space spelled as byte pieces <0xE2><0x96><0x81> (no usable lone '\u2581' piece): "
                           "3 bytes in the tables and in sp.decode (which prints '\u2581') for a 1-byte space; "
                           "bytes relative to the text, not to sp.decode",
    "decoder_mismatch": "the audit's decoder emulation disagrees with sp.decode: attribution incomplete "
                        "(a bug in this audit)",
    "unexplained": "the tables and the decoder disagree for no documented reason: a bug in the byte tables",
}
FAILING = ("unexplained", "decoder_mismatch", "byte_fallback_space")  # byte_fallback_space flatters val_bpb
CAUSE_NAMES = list(CAUSES)
CAUSE_IDS = {c: i for i, c in enumerate(CAUSE_NAMES)}
INFLATING = ("space_at_document_start",)  # documented, but counts a byte the text lacks


def _byte_widths(raw: bytes) -> list[int]:
    """Bytes the decoder prints for each byte of a run of byte pieces: 1 per byte of a valid UTF-8 character,
    3 per invalid byte. (SentencePiece replaces byte by byte; Python's errors="replace" would print a single
    U+FFFD for a truncated sequence such as E4 B8, so only the error positions are taken from Python.)"""
    widths = []
    while raw:
        try:
            raw.decode("utf-8")
            return widths + [1] * len(raw)
        except UnicodeDecodeError as e:
            widths += [1] * e.start + [REPLACEMENT_BYTES] * (e.end - e.start)
            raw = raw[e.end :]
    return widths


class _Decoder:
    """What sp.decode prints for each id, as arrays built from the tokenizer alone (not from train_gpt)."""

    def __init__(self, sp: spm.SentencePieceProcessor):
        n = sp.vocab_size()
        self.pieces = [sp.id_to_piece(i) for i in range(n)]
        self.is_byte = np.array([sp.is_byte(i) for i in range(n)])
        self.is_unk = np.array([sp.is_unknown(i) for i in range(n)])
        self.boundary = np.array([sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) for i in range(n)])
        self.byte_value = np.array([int(p[3:5], 16) if b else 0 for p, b in zip(self.pieces, self.is_byte)], np.uint8)
        # bytes printed in mid-document: a normal piece (unused ones print like normal ones) prints its text with
        # every "\u2581" as a space, but drops its leading one (self.lead) while the document has printed
        # nothing; a byte piece prints 1 byte (when valid UTF-8), <unk> its surface, a control piece nothing
        self.full = np.zeros(n, np.int64)
        self.lead = np.zeros(n, bool)
        for i, p in enumerate(self.pieces):
            if sp.is_unknown(i):
                self.full[i] = len(sp.decode([i]).encode("utf-8"))
            elif self.is_byte[i]:
                self.full[i] = 1
            elif not sp.is_control(i):
                self.full[i], self.lead[i] = len(p.replace(SPACE, " ").encode("utf-8")), p.startswith(SPACE)

    def emulate(self, tok: np.ndarray, doc: np.ndarray, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bytes printed for each token of concatenated documents (doc = document index of each token, local =
        its position in the document), and whether the document had printed anything before the token."""
        content = self.full[tok] - self.lead[tok]  # bytes printed while nothing has been printed yet
        first = np.full(doc[-1] + 1, len(tok))  # position of the first token that prints something
        has = content > 0
        docs_with, at = np.unique(doc[has], return_index=True)
        first[docs_with] = local[has][at]
        before = local > first[doc]
        out = np.where(before, self.full[tok], np.where(local == first[doc], content, 0))
        pos = np.flatnonzero(self.is_byte[tok])  # runs of byte pieces are decoded together
        for run in np.split(pos, np.flatnonzero((np.diff(pos) != 1) | (np.diff(doc[pos]) != 0)) + 1):
            raw = self.byte_value[tok[run]].tobytes()
            if raw and max(raw) >= 0x80:
                out[run] = _byte_widths(raw)
        return out, before


def _add(out: dict, tid: int | None, cause: str, nbytes: int, count: int = 1):
    occ, b = out.get((tid, cause), (0, 0))
    out[(tid, cause)] = (occ + count, b + nbytes)


def _attribute(dec: _Decoder, tokens: np.ndarray, per: np.ndarray, starts: np.ndarray, ends: np.ndarray,
               canonical: np.ndarray, bos: int, out: dict):
    """Emulate the decoder on the documents [starts, ends) and add (id, cause) -> (occurrences, bytes) for
    every token whose table count differs from what the decoder prints."""
    lens = ends - starts
    offsets = np.cumsum(lens) - lens
    doc = np.repeat(np.arange(len(lens)), lens)
    local = np.arange(lens.sum()) - offsets[doc]
    idx = starts[doc] + local
    tok, table = tokens[idx].astype(np.int64), per[idx]
    prev = np.where(local == 0, bos, tokens[idx - 1])
    printed, before = dec.emulate(tok, doc, local)
    for d in np.flatnonzero(np.bincount(doc, printed, len(lens)) != canonical):
        _add(out, None, "decoder_mismatch", int(canonical[d]) - int(printed[doc == d].sum()))
    diff = printed - table
    cause = np.full(len(tok), CAUSE_IDS["unexplained"])
    lead, boundary = dec.lead[tok], dec.boundary[prev]
    for name, where in (
        ("unk", dec.is_unk[tok] & (table == 0)),
        ("space_after_boundary", lead & before & boundary & (diff == 1)),
        ("space_at_document_start", lead & ~before & ~boundary & (diff == -1)),
        ("invalid_utf8", dec.is_byte[tok] & (printed == REPLACEMENT_BYTES) & (diff == REPLACEMENT_BYTES - 1)),
    ):
        cause[where] = CAUSE_IDS[name]
    m = diff != 0
    keys, inv = np.unique(tok[m] * len(CAUSE_IDS) + cause[m], return_inverse=True)
    for key, occ, nb in zip(keys, np.bincount(inv), np.bincount(inv, diff[m])):
        _add(out, int(key) // len(CAUSE_IDS), CAUSE_NAMES[key % len(CAUSE_IDS)], int(nb), int(occ))


def _table_bytes(tokens: np.ndarray, luts: ByteLUTs, chunk: int = 1 << 22) -> np.ndarray:
    """token_bytes of every position (prev = the token before it); position 0 has no prev and counts 0."""
    per = np.zeros(len(tokens), np.int32)
    for s in range(0, len(tokens) - 1, chunk):
        t = torch.from_numpy(tokens[s : s + chunk + 1].astype(np.int64))
        per[s + 1 : s + len(t)] = token_bytes(luts, t[:-1], t[1:]).numpy()
    return per


def audit(sp: spm.SentencePieceProcessor, tokens: np.ndarray, luts: ByteLUTs, max_docs: int | None = None,
          batch: int = 512, chunk: int = 1 << 22) -> dict:
    """Audit `tokens` (a shard's ids: documents starting with BOS) against the tables `luts`; return the
    report as a JSON-ready dict (see format_report for the meaning of its fields)."""
    tokens = np.asarray(tokens)
    n, bos = len(tokens), sp.bos_id()
    if bos < 0:
        raise ValueError("the tokenizer has no BOS piece, so documents cannot be delimited")
    if n and int(tokens.max()) >= sp.vocab_size():
        raise ValueError(f"token id {int(tokens.max())} is not in the tokenizer ({sp.vocab_size()} pieces)")
    starts = np.flatnonzero(tokens == bos) + 1
    ends = np.append(starts[1:] - 1, n)[: len(starts)]
    if max_docs is not None:
        starts, ends = starts[:max_docs], ends[:max_docs]
    per = _table_bytes(tokens, luts)
    csum = np.cumsum(per, dtype=np.int64)
    table = csum[ends - 1] - csum[starts - 1]  # starts - 1 is the document's BOS
    canonical = np.zeros(len(starts), np.int64)
    for b in range(0, len(starts), batch):
        docs = [tokens[s:e].tolist() for s, e in zip(starts[b : b + batch], ends[b : b + batch])]
        canonical[b : b + batch] = [len(text.encode("utf-8")) for text in sp.decode(docs)]

    dec, out = _Decoder(sp), {}
    differ = np.flatnonzero(table != canonical)
    done = np.cumsum(ends[differ] - starts[differ])  # emulate about `chunk` tokens at a time
    for group in np.split(differ, np.flatnonzero(np.diff(done // chunk)) + 1):
        if len(group):
            _attribute(dec, tokens, per, starts[group], ends[group], canonical[group], bos, out)

    spelled = [sp.piece_to_id(f"<0x{v:02X}>") for v in SPACE.encode("utf-8")]  # E2 96 81
    if all(dec.is_byte[i] for i in spelled) and len(starts):  # no table/decoder difference: found by a scan
        a, b, c = spelled
        hit = (tokens[:-2] == a) & (tokens[1:-1] == b) & (tokens[2:] == c)
        k = int(np.count_nonzero(hit[starts[0] : ends[-1]]))  # a triple cannot straddle a BOS
        if k:
            _add(out, a, "byte_fallback_space", -2 * k, k)

    causes: dict[str, dict] = {}
    for (_, cause), (occ, nb) in out.items():
        c = causes.setdefault(cause, {"occurrences": 0, "bytes": 0})
        c["occurrences"] += occ
        c["bytes"] += nb
    rows = [{"id": tid, "piece": None if tid is None else dec.pieces[tid], "cause": cause,
             "occurrences": occ, "bytes": nb} for (tid, cause), (occ, nb) in out.items()]
    rows.sort(key=lambda r: (-abs(r["bytes"]), -r["occurrences"], r["id"] if r["id"] is not None else -1))
    table_total, canonical_total = int(table.sum()), int(canonical.sum())
    return {
        "documents": len(starts),
        "tokens": int(ends[-1] - starts[0] + 1) if len(starts) else 0,  # from the first BOS on
        "tokens_before_first_bos": int(starts[0] - 1) if len(starts) else n,
        "table_bytes": table_total,
        "canonical_bytes": canonical_total,
        "ratio": table_total / canonical_total if canonical_total else None,
        "differing_documents": len(differ),
        "causes": dict(sorted(causes.items(), key=lambda kv: -abs(kv[1]["bytes"]))),
        "by_token": rows,
        "ok": not any(c in causes for c in FAILING),
    }


CASEOPS_CHECKS = {  # failure -> meaning, for audit_caseops
    "bos_counts_bytes": "a BOS entry of the sidecar is not 0",
    "operator_counts_bytes": "a token made only of case operators has a nonzero count",
    "undecodable": "the tokens decode to text that the CaseOps decoder rejects",
    "tokens_differ": "the shard's tokens are not those of the transformed input document",
    "counts_differ": "the sidecar's counts are not those of the input document's tokens",
    "bytes_differ": "the counts do not sum to the UTF-8 length of the original text",
    "text_differs": "decoding the tokens and inverting the transform does not give the (normalised) original text",
}


def audit_caseops(sp: spm.SentencePieceProcessor, tokens: np.ndarray, sidecar: np.ndarray,
                  texts: list[str] | None = None, max_docs: int | None = None) -> dict:
    """The sidecar audit of CaseOps shards (module docstring); texts: the original documents, in shard order."""
    tokens, sidecar = np.asarray(tokens), np.asarray(sidecar)
    if len(tokens) != len(sidecar):
        raise ValueError(f"the sidecar has {len(sidecar)} entries for {len(tokens)} tokens")
    bos = sp.bos_id()
    starts = np.flatnonzero(tokens == bos)
    ends = np.append(starts[1:], len(tokens))
    if max_docs is not None:
        starts, ends = starts[:max_docs], ends[:max_docs]
    if texts is not None and len(texts) < len(starts):
        raise ValueError(f"the shard has {len(starts)} documents, the input only {len(texts)}")
    operator_only = np.array([all(c in caseops.OPERATORS for c in sp.id_to_piece(i)) and not sp.is_control(i)
                              for i in range(sp.vocab_size())])
    fails: dict[str, list[int]] = {k: [] for k in CASEOPS_CHECKS}
    text_bytes = 0
    for d, (a, b) in enumerate(zip(starts, ends)):
        ids, counts = tokens[a + 1 : b].tolist(), sidecar[a + 1 : b]
        if sidecar[a]:
            fails["bos_counts_bytes"].append(d)
        if np.any(counts[operator_only[tokens[a + 1 : b]]]):
            fails["operator_counts_bytes"].append(d)
        try:
            decoded = caseops.decode(sp.decode(ids))
        except caseops.CaseOpsError:
            fails["undecodable"].append(d)
            decoded = None
        if texts is None:
            continue
        text = texts[d]
        text_bytes += len(text.strip().encode("utf-8"))
        want_ids, want_counts = caseops.document_tokens(sp, text)
        for failed, name in ((want_ids[1:] != ids, "tokens_differ"),
                             (want_counts[1:] != counts.tolist(), "counts_differ"),
                             (int(counts.sum()) != len(text.strip().encode("utf-8")), "bytes_differ"),
                             (decoded != sp.normalize(text).replace(SPACE, " "), "text_differs")):
            if failed:
                fails[name].append(d)
    return {
        "documents": len(starts), "tokens": int(ends[-1] - starts[0]) if len(starts) else 0,
        "sidecar_bytes": int(sidecar[starts[0] : ends[-1]].sum(dtype=np.int64)) if len(starts) else 0,
        "text_bytes": text_bytes if texts is not None else None, "proved": texts is not None,
        "failures": {k: {"documents": len(v), "first": v[:10]} for k, v in fails.items() if v},
        "ok": not any(fails.values()),
    }


def format_caseops_report(r: dict) -> str:
    lines = [f"documents {r['documents']:,}   tokens {r['tokens']:,}   sidecar bytes {r['sidecar_bytes']:,}   "
             f"original text bytes {'-' if r['text_bytes'] is None else format(r['text_bytes'], ',')}"]
    for k, f in r["failures"].items():
        lines.append(f"{k}: {f['documents']:,} documents (first: {f['first']}): {CASEOPS_CHECKS[k]}")
    if not r["proved"]:
        lines.append("structural checks only: give --input (the documents the shards were built from) to prove "
                     "the byte counts against the original text")
    lines.append("\nRESULT: " + ("FAIL" if not r["ok"] else "OK: the sidecar counts the original bytes of every "
                                 "document" if r["proved"] else "OK (structural)"))
    return "\n".join(lines)


def format_report(r: dict, top: int = 30) -> str:
    lines = [
        f"documents {r['documents']:,}   tokens {r['tokens']:,}   tokens before the first BOS (not audited) "
        f"{r['tokens_before_first_bos']:,}",
        f"table bytes {r['table_bytes']:,}   canonical bytes (sp.decode) {r['canonical_bytes']:,}   "
        f"table/canonical {r['ratio'] if r['ratio'] is None else format(r['ratio'], '.6f')}   "
        f"documents that differ {r['differing_documents']:,}",
    ]
    if r["causes"]:
        lines.append("\nbytes = canonical - table (+ the tables miss bytes, - they over-count)")
        lines.append(f"{'cause':<22}{'occurrences':>12}{'bytes':>12}  meaning")
        for cause, c in r["causes"].items():
            lines.append(f"{cause:<22}{c['occurrences']:>12,}{c['bytes']:>12,}  {CAUSES[cause]}")
        lines.append(f"\n{'id':>6}  {'piece':<16}{'cause':<22}{'occurrences':>12}{'bytes':>12}")
        for row in r["by_token"][:top]:
            piece = "-" if row["piece"] is None else repr(row["piece"])
            lines.append(f"{'-' if row['id'] is None else row['id']:>6}  {piece:<16}{row['cause']:<22}"
                         f"{row['occurrences']:>12,}{row['bytes']:>12,}")
        if len(r["by_token"]) > top:
            lines.append(f"... {len(r['by_token']) - top} more rows (--json lists them all)")
    for cause in INFLATING:
        if cause in r["causes"]:
            lines.append(f"\nWARNING: {cause} makes the count exceed the text by {-r['causes'][cause]['bytes']:,} "
                         "bytes (documented, but it flatters val_bpb)")
    if "byte_fallback_space" in r["causes"]:
        lines.append("\nThe tables over-count every byte-spelled space by 2 bytes: give the tokenizer a lone "
                     "'\u2581' piece (train_gpt.py refuses such a tokenizer).")
    failing = {c: r["causes"][c]["occurrences"] for c in FAILING if c in r["causes"]}
    lines.append("\nRESULT: " + (f"FAIL ({', '.join(f'{k}: {v:,}' for k, v in failing.items())})" if failing else
                                 "OK: every difference between the tables and sp.decode has a documented cause"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument("--shard", required=True, help="token shard (e.g. fineweb_val_000000.bin)")
    p.add_argument("--vocab-size", type=int, help="VOCAB_SIZE of the trainer (default: the tokenizer's)")
    p.add_argument("--max-docs", type=int, help="audit only the first N documents")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--sidecar", help="CaseOps: the byte sidecar (default: fineweb_val_bytes_N.bin beside the shard)")
    p.add_argument("--input", action="extend", nargs="+", metavar="JSONL",
                   help="CaseOps: the documents the shards were built from (validation documents first)")
    a = p.parse_args(argv)
    try:
        if not a.tokenizer.endswith(".model") or not os.path.isfile(a.tokenizer):
            raise ValueError(f"--tokenizer {a.tokenizer}: expected an existing SentencePiece .model file")
        try:
            sp = spm.SentencePieceProcessor(model_file=a.tokenizer)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"--tokenizer {a.tokenizer}: not a loadable SentencePiece model "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        vocab = sp.vocab_size() if a.vocab_size is None else a.vocab_size
        if vocab < sp.vocab_size():
            raise ValueError(f"--vocab-size {vocab}: smaller than the vocabulary of {a.tokenizer} "
                             f"({sp.vocab_size()} pieces)")
        if a.max_docs is not None and a.max_docs < 1:
            raise ValueError(f"--max-docs {a.max_docs}: must be at least 1")
        if not os.path.isfile(a.shard):
            raise ValueError(f"--shard {a.shard}: no such file")
        tokens = load_data_shard(a.shard, vocab)
        if len(tokens) and int(tokens.max()) >= sp.vocab_size():
            raise ValueError(f"{a.shard}: token id {int(tokens.max())} is not in the tokenizer {a.tokenizer} "
                             f"({sp.vocab_size()} pieces)")
        if sp.bos_id() < 0 or not np.any(tokens == sp.bos_id()):
            raise ValueError(f"{a.shard}: no BOS token (id {sp.bos_id()}), so no documents to audit")
        if data_variant(sp) == "caseops":
            return main_caseops(a, sp, tokens)
        report = audit(sp, tokens, build_byte_luts(sp, vocab), a.max_docs)
    except (ValueError, OSError, BuildError) as e:
        print(f"audit_bytes: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps({"tokenizer": a.tokenizer, "shard": a.shard, **report}, indent=1))
    else:
        print(f"byte audit of {a.shard} with {a.tokenizer} ({sp.vocab_size()} pieces, "
              f"{'with' if any(sp.is_byte(i) for i in range(sp.vocab_size())) else 'no'} byte fallback)")
        print(format_report(report))
    return 0 if report["ok"] else 1


def main_caseops(a, sp: spm.SentencePieceProcessor, tokens: np.ndarray) -> int:
    side = a.sidecar or sidecar_path(a.shard)
    if not os.path.isfile(side):
        raise ValueError(f"--sidecar {side}: no such file (a CaseOps tokenizer is scored on the byte sidecar)")
    sidecar = load_data_shard(side)
    if len(sidecar) != len(tokens):
        raise ValueError(f"{side}: {len(sidecar)} byte counts for {len(tokens)} tokens in {a.shard}: not its sidecar")
    n = int(np.count_nonzero(tokens == sp.bos_id()))
    texts = None
    if a.input:
        texts = list(itertools.islice(iter_documents(a.input), min(n, a.max_docs or n)))
    report = audit_caseops(sp, tokens, sidecar, texts, a.max_docs)
    if a.json:
        print(json.dumps({"tokenizer": a.tokenizer, "shard": a.shard, "sidecar": side, **report}, indent=1))
    else:
        print(f"CaseOps byte audit of {a.shard} and {side} with {a.tokenizer}")
        print(format_caseops_report(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
