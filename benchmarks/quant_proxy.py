"""CPU benchmark of weight averaging, quantization and compression on the bundled sample.

    python3 benchmarks/quant_proxy.py [--steps 300] [--skip-full-size]

1. Averaging: the seed stack at the CPU proxy size (4 layers, d=128, sequence 256, 8,192 tokens a step) is
   trained for --steps steps twice, identically except for the EMA rule: the records' fixed 0.997 and this
   script's warm-up. Printed: val_bpb of the raw final weights and of the averaged ones.
2. Quantization: on the warm-up-averaged model, round-to-nearest, GPTQ-lite and full GPTQ at int5 and int6
   (embeddings int8, every matrix quantized: FP16_MAX_NUMEL=4096), each read back and scored; the gap is
   round-trip val_bpb minus the averaged weights' val_bpb, with lzma bytes and the time each took.
3. Entropy: the quantized symbols of the int6 GPTQ artifact (int8 for the embeddings) compressed by zstd-22 and lzma, divided by their order-0 Shannon
   entropy (per tensor), i.e. how far the coder is from that limit; and the same ratio for the whole artifact.
4. Full size: the default (the frontier preset, 35.9M parameters, CaseOps SP8192) and the seed stack (27M) each
   trained 2 steps on CPU and exported as a record run would (benchmarks/proxy.py full_size_run): code bytes,
   model bytes and the total, which must fit 16,000,000, and the export's time.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# proxy first: it puts the repository root and data/ on sys.path
from proxy import CPU, ensure_sample, full_size_run, proxy_h, trained
import train_gpt as tg


def averaging(steps: int):
    rows, kept = [], None
    for warmup in (0, 1):
        h = proxy_h(steps, EMA_WARMUP=str(warmup))
        model, val, result, hessians, sp = trained(h)
        avg = tg.eval_val(h, CPU, model, val)
        rows.append((f"EMA 0.997 {'with warm-up' if warmup else 'fixed (records)'}", result.final.val_bpb,
                     avg.val_bpb))
        kept = (h, model, val, hessians, sp, avg.val_bpb)
    print("\n| EMA rule | raw final val_bpb | averaged val_bpb |\n|---|---|---|")
    for name, raw, avg in rows:
        print(f"| {name} | {raw:.4f} | {avg:.4f} |")
    return kept


def quantization(h, model, val, hessians, sp, before: float):
    kinds = {n: k for k, members in tg.param_groups(model).items() for n, _ in members}
    sd = model.state_dict()
    print(f"\naveraged weights before quantization: val_bpb {before:.4f}")
    print("| method | bits | round-trip val_bpb | gap | lzma bytes | quantize+encode s |\n|---|---|---|---|---|---|")
    int6_gptq = None
    for bits in (5, 6):
        for method in ("rtn", "gptq_lite", "gptq"):
            hq = dataclasses.replace(h, quant_method=method, quant_mlp_bits=bits, quant_attn_bits=bits, compressor="lzma",
                                     **({"quant_clip": "sdclip"} if method == "gptq_lite" else {}))  # its own search
            t0 = time.perf_counter()
            tensors, meta = tg.quantize_state(hq, sd, kinds, hessians)
            blob = tg.encode_artifact(tensors, meta, "lzma")
            seconds = time.perf_counter() - t0
            fresh = tg.build_model(hq, CPU, sp.bos_id())
            fresh.load_state_dict(tg.decode_artifact(blob, hq, "benchmark"), strict=True)
            r = tg.eval_val(hq, CPU, fresh, val)
            print(f"| {method} | int{bits} | {r.val_bpb:.4f} | {r.val_bpb - before:+.4f} | {len(blob):,} | {seconds:.1f} |")
            if bits == 6 and method == "gptq":
                int6_gptq = (tensors, meta)
    return int6_gptq


def entropy(tensors: dict, meta: dict):
    symbols = [tensors[n + ".q"] for n, i in meta["tensors"].items() if 0 < i["bits"] < tg.FP16]
    bits = 0.0
    for q in symbols:
        counts = np.bincount(q.flatten().numpy().astype(np.int64) + 128, minlength=256)
        p = counts[counts > 0] / counts.sum()
        bits += -(counts[counts > 0] * np.log2(p)).sum()
    raw = b"".join(q.numpy().tobytes() for q in symbols)
    container = tg.pack_tensors(tensors, meta)
    print(f"\nquantized symbols of the int6 GPTQ artifact (int6 matrices, int8 embeddings): "
          f"{sum(q.numel() for q in symbols):,} values, order-0 entropy {bits / 8:,.0f} bytes "
          f"({bits / sum(q.numel() for q in symbols):.3f} bits/value)")
    print("| compressor | symbols: bytes | / entropy | whole artifact: bytes | seconds |\n|---|---|---|---|---|")
    for comp in ("zstd", "lzma"):
        t0 = time.perf_counter()
        whole = len(tg.compress(container, comp))
        seconds = time.perf_counter() - t0
        sym = len(tg.compress(raw, comp))
        print(f"| {comp} | {sym:,} | {sym / (bits / 8):.3f} | {whole:,} | {seconds:.1f} |")


def full_size(work: Path, name: str):
    """configs/<name>.env at full size, 2 steps on CPU, exported (proxy.full_size_run)."""
    t0 = time.perf_counter()
    out = full_size_run(work, name)
    keep = ("model_params", "quantization", "Serialized", "Code size", "Total submission", "artifact", "narrow", "selective",
            "time_ledger phase:export", "final_")
    print(f"\nfull-size {name}, 2 CPU steps ({time.perf_counter() - t0:.0f} s in all):")
    print("\n".join(line for line in out.splitlines() if line.startswith(keep)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--skip-full-size", action="store_true")
    a = p.parse_args(argv)
    ensure_sample()
    torch.manual_seed(0)
    h, model, val, hessians, sp, before = averaging(a.steps)
    tensors, meta = quantization(h, model, val, hessians, sp, before)
    entropy(tensors, meta)
    if not a.skip_full_size:
        for name in ("frontier", "seed_stack"):  # the default, and the seed stack's preset
            with tempfile.TemporaryDirectory() as tmp:
                full_size(Path(tmp), name)


if __name__ == "__main__":
    main()
