"""Pack train_gpt.py into a small self-extracting Python file, so fewer code bytes count toward the cap.

    python3 tools/pack.py [train_gpt.py] [-o train_gpt_packed.py] [--compressor lzma|brotli]

The challenge counts the bytes of the script that runs. pack.py strips the source (docstrings, comments, blank
lines, indentation to one space a level, spaces between tokens where none is needed), compresses it and writes a
Python file of five lines (the literal holds line breaks too): a latin-1 coding line, the imports, the compressed
bytes in a string literal, the stripped source registered for tracebacks, and an exec of it with __name__ and
__file__ passed through and the source as PACKED_SOURCE, which train_gpt.py reads to log the source that ran and
count the packed file's bytes (`counted:packed`). Output is byte-for-byte reproducible: fixed compressor settings,
no timestamps, no file names in the stream, and the same stripped source whichever of Python 3.10-3.12 runs it.
"""

import argparse
import ast
import functools
import io
import lzma
import os
import re
import sys
import tokenize
from pathlib import Path

# LZMA1 in the .lzma ("alone") container: 13 header bytes and no checksum, and lzma.decompress detects it on its
# own, so the decompress call needs no format/filters arguments. On train_gpt.py this is smaller than XZ
# (block/index/footer overhead) and than RAW (whose decoder needs the filter chain spelled out in the wrapper).
# lc=3/lp=0/pb=0 suits text: source code has no 2- or 4-byte alignment for pb to exploit.
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 0, "pb": 0}]
COMPRESSORS = ("lzma", "brotli")
# this format's first two lines, or the first two of the earlier base85 format
PACKED_HEADER = re.compile(rb"\A(#coding:l1\r?\nimport (lzma|brotli),linecache as L|import base64,(lzma|brotli))\r?\n")
# The name the stripped source runs under, a file that does not exist: a traceback printed by the traceback module
# shows the stripped lines from linecache, and none shows the readable train_gpt.py's lines at the stripped numbers.
FILENAME = "train_gpt_stripped.py"
WRAPPER = ('#coding:l1\nimport {c},linecache as L\nS={c}.decompress({literal}.encode("l1"))\n'
           f'F="{FILENAME}";L.cache[F]=(len(S),None,S.decode().splitlines(1),F)\n'
           'exec(compile(S,F,"exec"),{{"__name__":__name__,"__file__":__file__,"PACKED_SOURCE":S}})\n')


# ---- stripping ----


def physical_lines(source: str) -> list[str]:
    """The lines as tokenize and ast number them: ended by LF only (str.splitlines also splits at form feeds)."""
    return io.StringIO(source).readlines()


def line_starts(lines: list[str]) -> list[int]:
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    return starts


def docstring_spans(source: str, tree: ast.Module) -> dict[int, tuple[int, bool]]:
    """{start offset: (end offset, whether it is its body's only statement)} of each docstring statement
    (the first statement of a module, class or function body, when it is a string constant)."""
    lines = physical_lines(source)
    starts = line_starts(lines)

    def offset(row: int, col: int) -> int:  # ast columns count UTF-8 bytes, str offsets count characters
        return starts[row - 1] + len(lines[row - 1].encode()[:col].decode())

    spans = {}
    for node in ast.walk(tree):
        if is_docstring_owner(node) and has_docstring(node):
            doc = node.body[0]
            spans[offset(doc.lineno, doc.col_offset)] = (offset(doc.end_lineno, doc.end_col_offset),
                                                         len(node.body) == 1)
    return spans


def is_docstring_owner(node: ast.AST) -> bool:
    return isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))


def has_docstring(node: ast.AST) -> bool:
    first = node.body[0] if node.body else None
    return (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str))


def without_docstrings(tree: ast.Module) -> ast.Module:
    """The tree strip() must reproduce: every docstring statement removed, and a body it leaves empty holding
    `pass`. (Removing one can promote a following string statement to docstring; that one stays, as in strip.)"""
    for node in [n for n in ast.walk(tree) if is_docstring_owner(n) and has_docstring(n)]:
        del node.body[0]
        node.body = node.body or [ast.Pass()]
    return tree


def atoms(source: str):
    """The tokens as (type, text, start offset, end offset), with each f-string one STRING atom copied from the
    source: Python 3.12 tokenizes f-strings into FSTRING_START/MIDDLE/END pieces whose text is not the source
    (a `{{` in the source is `{` in FSTRING_MIDDLE), so the span between its start and end is taken instead."""
    starts = line_starts(physical_lines(source))
    fstring_start, fstring_end = getattr(tokenize, "FSTRING_START", -1), getattr(tokenize, "FSTRING_END", -1)
    depth, begin = 0, 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        start, end = starts[tok.start[0] - 1] + tok.start[1], starts[tok.end[0] - 1] + tok.end[1]
        if tok.type == fstring_start:
            depth += 1
            begin = start if depth == 1 else begin
        elif tok.type == fstring_end:
            depth -= 1
            if depth == 0:
                yield tokenize.STRING, source[begin:end], begin, end
        elif depth == 0:
            yield tok.type, tok.string, start, end


def _word(c: str) -> bool:
    return c.isalnum() or c == "_" or not c.isascii()


@functools.lru_cache(maxsize=None)
def needs_space(a: str, b: str) -> bool:
    """Whether tokens a and b need a space between them: when their concatenation does not tokenize back into
    a and b. Two word characters always get one (`1if` tokenizes on 3.10-3.12 but is deprecated syntax)."""
    if _word(a[-1]) and _word(b[0]):
        return True
    spans, n = [], len(a) + len(b)
    try:  # tokens come before the error an open bracket raises at the end (`f(` is f and `(`)
        for _, _, start, end in atoms(a + b):
            spans.append((start, end))
            if end >= n:
                break
    except (tokenize.TokenError, SyntaxError):
        return True
    return spans != [(0, len(a)), (len(a), n)]


def strip(source: str) -> str:
    """The source without docstrings, comments and blank lines, one logical line per line, indented one space a
    level, with a space between two tokens only where needs_space says so; string literals copied verbatim."""
    docstrings = docstring_spans(source, ast.parse(source))
    lines, line, depth, toks, i = [], [], 0, list(atoms(source)), 0
    while i < len(toks):
        kind, text, start, _ = toks[i]
        i += 1
        if start in docstrings:
            end, alone = docstrings[start]
            while toks[i][2] < end:
                i += 1
            if alone:
                line.append("pass")
            elif toks[i][1] == ";":  # `"doc"; x = 1` -> `x = 1`
                i += 1
            continue
        if kind == tokenize.INDENT:
            depth += 1
        elif kind == tokenize.DEDENT:
            depth -= 1
        elif kind == tokenize.NEWLINE:
            if line:
                lines.append(" " * depth + line[0] + "".join((" " if needs_space(p, t) else "") + t
                                                             for p, t in zip(line, line[1:])))
            line = []
        elif kind == tokenize.ERRORTOKEN:  # Python's tokenize module misreads something the compiler reads
            raise ValueError(f"tokenize cannot read {text!r} at offset {start} (a rare identifier character?)")
        elif kind not in (tokenize.COMMENT, tokenize.NL, tokenize.ENDMARKER):
            line.append(text)
    return "".join(l + "\n" for l in lines)


def check_stripped(source: str, stripped: str):
    """strip() changed nothing but docstrings: the ASTs (without positions) are equal, docstrings removed."""
    expected = ast.dump(without_docstrings(ast.parse(source)))
    if ast.dump(ast.parse(stripped)) != expected:
        raise AssertionError("the stripped source is not the source without docstrings (a bug in pack.py)")
    compile(stripped, FILENAME, "exec", dont_inherit=True)


# ---- packing ----


def _brotli():
    """brotli is optional (pip install brotli); lzma ships with Python."""
    try:
        import brotli
    except ImportError:
        raise ModuleNotFoundError("brotli is not installed: pip install brotli") from None
    return brotli


def compress(data: bytes, compressor: str) -> bytes:
    if compressor == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE, filters=LZMA_FILTERS)
    if compressor == "brotli":
        brotli = _brotli()
        return brotli.compress(data, mode=brotli.MODE_TEXT, quality=11, lgwin=24)
    raise ValueError(f"unknown compressor {compressor!r}: choose one of {', '.join(COMPRESSORS)}")


def latin1_literal(blob: bytes) -> str:
    """A str literal whose latin-1 encoding is blob, in a latin-1 source file: each byte is its own character
    except backslash, CR (Python reads it as a line end), NUL (not allowed in source) and the quote, escaped.
    Triple quotes keep LF raw; a quote is escaped only where it would close the literal (the third of three in a
    row, or the last byte). Whichever quote character needs fewer escapes is used."""
    def body(q: bytes) -> str:
        out, run = [], 0
        for i, b in enumerate(blob):
            c = bytes([b])
            if c == q:
                run += 1
                if run == 3 or i == len(blob) - 1:
                    c, run = b"\\" + q, 0
            else:
                run = 0
                if c == b"\\":
                    c = b"\\\\"
                elif c == b"\r":
                    c = b"\\r"
                elif c == b"\0":  # \0 then an octal digit would read as one escape
                    c = b"\\000" if blob[i + 1:i + 2].isdigit() else b"\\0"
            out.append(c)
        return (q * 3 + b"".join(out) + q * 3).decode("latin-1")

    return min(body(b'"'), body(b"'"), key=len)


def pack(source: bytes, compressor: str = "lzma") -> bytes:
    """The packed file's bytes. Raises ValueError if source is not UTF-8, not valid Python or already packed."""
    if PACKED_HEADER.match(source):
        raise ValueError("the input is already packed (it is the output of tools/pack.py)")
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"the input is not UTF-8 text: {e}") from None
    try:  # a syntax error would otherwise only surface on the GPU box, after packing
        compile(text, "<input>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"the input is not valid Python: {e}") from None
    stripped = strip(text)
    check_stripped(text, stripped)
    data = stripped.encode("utf-8")
    blob = compress(data, compressor)
    packed = WRAPPER.format(c=compressor, literal=latin1_literal(blob)).encode("latin-1")
    assert unpack(packed) == data, "the packed file does not hold the stripped source"
    return packed


def unpack(packed: bytes) -> bytes:
    """The stripped source a packed file holds, read from the literal as Python reads the file."""
    tree = ast.parse(packed)
    compressor = tree.body[0].names[0].name
    blob = tree.body[1].value.args[0].func.value.value.encode("latin-1")
    return (lzma.decompress if compressor == "lzma" else _brotli().decompress)(blob)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/pack.py", description=__doc__.split("\n\n")[0])
    p.add_argument("input", nargs="?", default="train_gpt.py", type=Path, help="script to pack (train_gpt.py)")
    p.add_argument("-o", "--output", type=Path, help="packed file (default: <input stem>_packed.py beside it)")
    p.add_argument("--compressor", choices=COMPRESSORS, default="lzma")
    args = p.parse_args(argv)
    out = args.output or args.input.with_name(f"{args.input.stem}_packed.py")
    try:
        if out.resolve() == args.input.resolve():
            raise ValueError("the output would overwrite the input")
        source = args.input.read_bytes()
        packed = pack(source, args.compressor)
    except (OSError, ValueError, ModuleNotFoundError) as e:
        print(f"pack.py: error: {args.input}: {e}", file=sys.stderr)
        return 2
    tmp = out.with_name(f".{out.name}.tmp")  # atomic: a reader never sees half a file
    tmp.write_bytes(packed)
    os.replace(tmp, out)
    print(f"packed {args.input} -> {out} compressor:{args.compressor} source_bytes:{len(source)} "
          f"stripped_bytes:{len(unpack(packed))} packed_bytes:{len(packed)} ratio:{len(packed) / len(source):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
