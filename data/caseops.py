"""CaseOps: the lossless case transform of the final records' SP8192 data (PR #1729), and the byte sidecar that
scores them on the original text.

The transform rewrites every maximal run of ASCII letters [A-Za-z]+ in lowercase, with private-use operators
saying how to restore the case; everything else passes through, so a tokenizer trained on transformed text
never spends pieces on "The" next to "the":

- a lowercase word is unchanged;
- an ALLCAPS word of 2 letters or more becomes ALLCAPS + the word in lowercase;
- any other word with an uppercase letter becomes TITLE (if its first letter is uppercase) + its first letter
  in lowercase, then each later letter in lowercase, preceded by CAPNEXT if it was uppercase. So "Hello" is
  TITLE hello, "I" is TITLE i, "iPhone" is i CAPNEXT phone, "McDonald" is TITLE mc CAPNEXT donald;
- a literal operator character in the text is escaped as ESC + the character.

decode() inverts encode() exactly, on any string. The sidecar (fineweb_val_bytes_*.bin, written by
data/build_shards.py --caseops) gives each validation token the number of original UTF-8 bytes it accounts
for: piece_byte_counts walks the text each token covers with a small state machine (an operator counts 0, ESC
counts 0 and the character it escapes its UTF-8 length, every other character its UTF-8 length), so the
counts of a document sum to the UTF-8 length of the untransformed text the tokenizer kept.
"""

from __future__ import annotations

from typing import Iterable

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)  # ids 4-7 of a CaseOps tokenizer, in this order
TOKENIZER_SETTINGS = dict(user_defined_symbols=list(OPERATORS))  # added to build_shards' official settings


class CaseOpsError(ValueError):
    """A string that encode() cannot have produced."""


def _is_letter(ch: str) -> bool:
    return "a" <= ch <= "z" or "A" <= ch <= "Z"


def _encode_word(word: str) -> str:
    lower = word.lower()
    if word == lower:
        return word
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    head = TITLE if word[0].isupper() else ""
    return head + lower[0] + "".join(CAPNEXT + c if o.isupper() else c for o, c in zip(word[1:], lower[1:]))


def encode(text: str) -> str:
    out, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if _is_letter(ch):
            j = i + 1
            while j < n and _is_letter(text[j]):
                j += 1
            out.append(_encode_word(text[i:j]))
            i = j
            continue
        out.append(ESC + ch if ch in OPERATORS else ch)
        i += 1
    return "".join(out)


def decode(text: str) -> str:
    """The inverse of encode(); a string encode() cannot produce (an operator not followed by the letter it
    applies to, a dangling ESC) raises CaseOpsError."""
    out = []
    escaped = in_word = allcaps = capnext = False
    mode = None  # TITLE or ALLCAPS, waiting for the first letter of a word
    for ch in text:
        if escaped:
            out.append(ch)
            escaped, in_word, allcaps = False, False, False
        elif ch == ESC:
            if mode or capnext:
                raise CaseOpsError("a case operator is followed by an escaped character, not a letter")
            escaped = True
        elif ch in (TITLE, ALLCAPS):
            if mode or capnext or in_word:
                raise CaseOpsError(f"operator U+{ord(ch):04X} inside a word or after another operator")
            mode = ch
        elif ch == CAPNEXT:
            if capnext or mode:
                raise CaseOpsError("CAPNEXT after another operator")
            capnext = True
        elif _is_letter(ch):
            allcaps = allcaps if in_word else mode == ALLCAPS
            out.append(ch.upper() if mode or capnext or allcaps else ch)
            mode, capnext, in_word = None, False, True
        else:
            if mode or capnext:
                raise CaseOpsError(f"a case operator is followed by {ch!r}, not a letter")
            out.append(ch)
            in_word = allcaps = False
    if escaped or mode or capnext:
        raise CaseOpsError("the text ends with a dangling operator")
    return "".join(out)


def piece_byte_counts(surfaces: Iterable[str]) -> list[int]:
    """The original UTF-8 bytes of each token, from the transformed text each one covers (its surface), in
    order: the state machine of the sidecar (module docstring). An ESC's character may sit in the next token."""
    counts, escaped = [], False
    for surface in surfaces:
        n = 0
        for ch in surface:
            if escaped or ch not in OPERATORS:
                n += len(ch.encode("utf-8"))
                escaped = False
            else:
                escaped = ch == ESC
        counts.append(n)
    return counts


def token_surfaces(sp, text: str) -> tuple[list[int], list[str]]:
    """SentencePiece's ids of text and the part of text each id covers (empty for all but the last byte piece
    of a character; leading and trailing whitespace belongs to no token)."""
    m = sp.encode(text, out_type="offset_mapping")
    return m["ids"], [text[a:b] for a, b in m["offsets"]]


def document_tokens(sp, text: str) -> tuple[list[int], list[int]]:
    """(ids, byte counts) of one original document as it goes into the shards: BOS (0 bytes), then the ids of
    the transformed text with the original bytes of each."""
    ids, surfaces = token_surfaces(sp, encode(text))
    return [sp.bos_id()] + ids, [0] + piece_byte_counts(surfaces)

