"""Pack train_gpt.py into a small self-extracting Python file, so fewer code bytes count toward the cap.

    python3 tools/pack.py [train_gpt.py] [-o train_gpt_packed.py] [--compressor lzma|brotli]

The challenge counts the bytes of the script that runs. The packed file is three ASCII lines: import, decompress
a base85 literal, exec the source with __name__/__file__ passed through and the source as PACKED_SOURCE, which
train_gpt.py reads to log the real source and count the packed file's bytes (`counted:packed`).
Output is byte-for-byte reproducible: fixed compressor settings, no timestamps, no file names in the stream.
"""

import argparse
import base64
import lzma
import os
import re
import sys
from pathlib import Path

# LZMA1 in the .lzma ("alone") container: 13 header bytes and no checksum, and lzma.decompress detects it on its
# own, so the decompress call needs no format/filters arguments. On train_gpt.py this is smaller than XZ
# (block/index/footer overhead) and than RAW (whose decoder needs the filter chain spelled out in the wrapper).
# lc=3/lp=0/pb=0 suits text: source code has no 2- or 4-byte alignment for pb to exploit.
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 0, "pb": 0}]
COMPRESSORS = ("lzma", "brotli")
PACKED_HEADER = re.compile(rb"\Aimport base64,(lzma|brotli)\r?\nS=\1\.decompress\(")


def _brotli():
    """brotli is optional (pip install brotli); lzma ships with Python."""
    try:
        import brotli
    except ImportError:
        raise ModuleNotFoundError("brotli is not installed: pip install brotli") from None
    return brotli


def compress(source: bytes, compressor: str) -> bytes:
    if compressor == "lzma":
        return lzma.compress(source, format=lzma.FORMAT_ALONE, filters=LZMA_FILTERS)
    if compressor == "brotli":
        brotli = _brotli()
        return brotli.compress(source, mode=brotli.MODE_TEXT, quality=11, lgwin=24)
    raise ValueError(f"unknown compressor {compressor!r}: choose one of {', '.join(COMPRESSORS)}")


def pack(source: bytes, compressor: str = "lzma") -> bytes:
    """The packed file's bytes. Raises ValueError if source is not valid Python or is already packed."""
    if PACKED_HEADER.match(source):
        raise ValueError("the input is already packed (it is the output of tools/pack.py)")
    try:  # a syntax error would otherwise only surface on the GPU box, after packing
        compile(source, "<input>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"the input is not valid Python: {e}") from None
    blob = compress(source, compressor)
    decompress = lzma.decompress if compressor == "lzma" else _brotli().decompress
    assert decompress(blob) == source, "compressor round trip failed"
    # base85's alphabet has no quote or backslash, so the literal needs no escaping
    return (f"import base64,{compressor}\n"
            f'S={compressor}.decompress(base64.b85decode(b"{base64.b85encode(blob).decode()}"))\n'
            'exec(compile(S,"train_gpt.py","exec"),{"__name__":__name__,"__file__":__file__,"PACKED_SOURCE":S})\n'
            ).encode("ascii")


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
          f"packed_bytes:{len(packed)} ratio:{len(packed) / len(source):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
