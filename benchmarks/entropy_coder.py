"""COMPRESSOR=rans against the general-purpose compressors and the records' per-group lrzip (COMPRESSOR=pergroup,
where the lrzip binary is installed; this script installs nothing), on the quantized symbols of trained models.

    python3 benchmarks/entropy_coder.py [--steps 300] [--artifact PATH ...] [--skip-full-size]

--steps 0 skips the proxy model; --artifact also takes a packed container (train_gpt.pack_tensors).

1. Models: the seed stack at the CPU proxy size trained --steps steps, exported as the default export does
   (GPTQ int6 matrices, int8 embeddings, every matrix quantized); the full-size default (the frontier preset,
   35.9M parameters) trained 2 steps on CPU as benchmarks/quant_proxy.py step 4 does (near its initialization,
   so not representative of trained weight statistics); and any --artifact (e.g. final_model.ptz of a GPU run).
2. For each: the whole artifact payload (the packed container) compressed by lzma-9e, zstd-22, brotli-11,
   lrzip-pergroup and rans, each relative to the best of the others, with seconds to encode and decode; the
   int8 symbols' order-0 entropy (one table per tensor) and what rans spends on them; what a context model
   could spend at best (its tables free: the conditional entropy) given the rANS spread context, given the
   previous symbol's magnitude, and given both.
3. Variants: the rANS model's RANS_GRID (spread codes per octave; 1 = coarse, few tables), RANS_REFS (reference
   rows a row; 0 = none), RANS_BITS (table precision) and RANS_LANES (interleaved states), and for the
   general-purpose compressors on the symbols alone: as stored, each tensor's rows sorted by their rms (a
   similarity sort), and the symbols split into a high-nibble and a low-nibble stream.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# proxy first: it puts the repository root and data/ on sys.path
from proxy import ensure_sample, full_size_run, proxy_h, trained
import train_gpt as tg

GENERAL = ("lzma", "zstd", "brotli") if tg.brotli else ("lzma", "zstd")
CODERS = (*GENERAL, *(("pergroup",) if shutil.which("lrzip") else ()), "rans")


def proxy_container(steps: int) -> bytes:
    """The proxy model trained `steps` steps, quantized as export does; the packed container."""
    h = proxy_h(steps)
    model, _, _, hessians, _ = trained(h)
    kinds = {n: k for k, members in tg.param_groups(model).items() for n, _ in members}
    return tg.pack_tensors(*tg.quantize_state(h, model.state_dict(), kinds, hessians))


def full_size_artifact(work: Path) -> Path:
    """The default (frontier) at full size, 2 steps on CPU, exported (benchmarks/quant_proxy.py step 4)."""
    full_size_run(work)
    return work / tg.ARTIFACT_PATH


def artifact_container(path: Path) -> bytes:
    """The packed container inside an artifact (or the file itself if it is a container)."""
    blob = path.read_bytes()
    if blob.startswith(tg.CONTAINER_MAGIC):
        return blob
    head = len(tg.ARTIFACT_MAGIC) + 2 + 32
    return tg.decompress(blob[head:], tg.COMPRESSORS[blob[len(tg.ARTIFACT_MAGIC) + 1]])


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def conditional_bytes(keys: np.ndarray, syms: np.ndarray) -> float:
    """H(symbol | key) in bytes, from the counts themselves."""
    joint, marg = np.bincount(keys * 256 + syms), np.bincount(keys)
    xlogx = lambda c: (c[c > 0] * np.log2(c[c > 0])).sum()  # noqa: E731
    return (xlogx(marg) - xlogx(joint)) / 8


def compare(label: str, data: bytes):
    tensors, meta = tg.unpack_tensors(data)
    symbols = {n: t for n, t in tensors.items() if t.dtype == torch.int8}
    n = sum(t.numel() for t in symbols.values())
    h0 = sum(tg.entropy_bytes(t) for t in symbols.values())
    ideal = np.zeros(3)
    for t in symbols.values():  # the bound of a context model whose tables cost nothing
        q = t.numpy().reshape(-1, t.shape[-1] if t.dim() else 1)
        rc = np.add.outer(*(c.astype(np.int64) + 64 for c in tg.spread_codes(q))).ravel()
        prev = np.minimum(np.abs(np.pad(q[:, :-1], ((0, 0), (1, 0))).astype(np.int64)), 7).ravel()
        ideal += [conditional_bytes(k, q.view(np.uint8).ravel()) for k in (rc, prev, rc * 8 + prev)]
    sizes = {}
    print(f"\n{label}: container {len(data):,} bytes, {n:,} int8 symbols, order-0 entropy (per tensor) "
          f"{h0:,.0f} bytes ({8 * h0 / max(n, 1):.3f} bits/symbol); a context model at best (tables free): "
          f"{ideal[0]:,.0f} given the rANS context, {ideal[1]:,.0f} given the previous symbol's magnitude, "
          f"{ideal[2]:,.0f} given both ({ideal.min() / max(h0, 1):.4f} x order-0)")
    print("| compressor | bytes | / best other | encode s | decode s |\n|---|---|---|---|---|")
    rows = []
    for m in CODERS:
        out, enc = timed(tg.compress, data, m)
        back, dec = timed(tg.decompress, out, m)
        assert back == data
        sizes[m] = len(out)
        rows.append((m, len(out), enc, dec))
        if m == "rans":
            head = int.from_bytes(out[1:5], "little")
            words = len(out) - 5 - head
    for m, size, enc, dec in rows:
        best, label = min(v for k, v in sizes.items() if k != m), "lrzip-pergroup" if m == "pergroup" else m
        print(f"| {label} | {size:,} | {size / best:.4f} | {enc:.1f} | {dec:.2f} |")
    print(f"rans: symbol stream {words:,} bytes ({words / h0:.4f} x order-0 entropy, final states included), "
          f"the rest (scales, fp16 tensors, metadata, tables, spread codes, references) {head + 5:,} bytes via "
          f"{tg.COMPRESSORS[out[0]]}")
    return tensors, meta, symbols


def variants(tensors: dict, meta: dict, symbols: dict):
    data = tg.pack_tensors(tensors, meta)
    print("\n| variant | bytes |\n|---|---|")
    for knob, values in (("RANS_GRID", (1, 2, 4, 8)), ("RANS_REFS", (0, 1, 2, 3)), ("RANS_BITS", (12, 14, 15)),
                         ("RANS_LANES", (1024, 4096))):
        default = getattr(tg, knob)
        for v in values:
            setattr(tg, knob, v)
            print(f"| rans {knob}={v}{' (default)' if v == default else ''} | {len(tg.compress(data, 'rans')):,} |")
        setattr(tg, knob, default)
    raw = b"".join(t.numpy().tobytes() for t in symbols.values())
    sort = b"".join(t.view(t.shape[0] if t.dim() else 1, -1)[
        torch.argsort(t.view(t.shape[0] if t.dim() else 1, -1).float().square().mean(1))].numpy().tobytes()
        for t in symbols.values())
    u = np.frombuffer(raw, np.uint8)
    split = ((u >> 4).astype(np.uint8).tobytes(), (u & 15).astype(np.uint8).tobytes())
    for m in GENERAL:
        print(f"| {m}, symbols only, as stored | {len(tg.compress(raw, m)):,} |")
        print(f"| {m}, symbols only, rows sorted by rms | {len(tg.compress(sort, m)):,} |")
        print(f"| {m}, symbols only, high/low nibble streams | {sum(len(tg.compress(s, m)) for s in split):,} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--artifact", type=Path, action="append", default=[])
    p.add_argument("--skip-full-size", action="store_true")
    a = p.parse_args(argv)
    ensure_sample()
    torch.manual_seed(0)
    if a.steps:
        variants(*compare(f"proxy size (4L d=128), trained {a.steps} steps on the sample, GPTQ int6/int8",
                          proxy_container(a.steps)))
    for path in a.artifact:
        variants(*compare(f"artifact {path}", artifact_container(path)))
    if not a.skip_full_size:
        with tempfile.TemporaryDirectory() as tmp:
            path = full_size_artifact(Path(tmp))
            variants(*compare("full-size default (frontier, 35.9M parameters), 2 CPU steps from initialization",
                              artifact_container(path)))


if __name__ == "__main__":
    main()
