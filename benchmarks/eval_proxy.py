"""CPU speed of the evaluators, and their projected time for the default configuration on 8xH100.

    python3 benchmarks/eval_proxy.py [--tokens 32768] [--threads 2]

1. CPU: the seed stack at the CPU proxy size (4 layers, d=128, 4/2 heads, sequence 256) scores the first
   --tokens validation targets of the bundled sample with the plain evaluator (stride = window), the sliding
   window at stride 64, and legal TTT (stride 64, chunks of 16 sequences, 3 epochs, SGD), as
   train_gpt.evaluate runs them. Printed: scored tokens per second, and the model FLOPs each performed
   (train_gpt.forward_flops_per_token; TTT training counts 3x forward) per second, so the evaluators'
   overheads beyond their FLOPs show.
2. 8xH100 projection for the default configuration (11L d=512, window 2048) on the official validation set
   (62,021,632 targets): FLOPs of each evaluator, divided by the throughput the records achieved on the same
   model and hardware (PR #1019: 86.7 ms per 786,432-token training step, its stride-64 sliding evaluation
   in about 85 s; PR #549: legal TTT in about 408 s), expressed as MFU of the
   8 x 989.4 bf16 dense TFLOP/s.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

# proxy first: it puts the repository root and data/ on sys.path
from proxy import CPU, DATA, PROXY, TOKENIZER, ensure_sample
import train_gpt as tg

H100_BF16_FLOPS = 989.4e12  # dense, per GPU (H100 SXM datasheet)
VAL_TARGETS = 62_021_632  # the official validation set, as every record since 03-19 scores it
RECORD_TRAIN_STEP_S, RECORD_TRAIN_TOKENS = 0.0867, 786_432  # PR #1019
RECORD_SLIDING_S, RECORD_TTT_S = 85.0, 408.0  # PR #1019 sliding stride 64; PR #549 legal TTT (its eval loop)


def eval_flops(h: tg.Hyperparameters, n: int, seq_len: int, stride: int, ttt: bool) -> float:
    """Model FLOPs of evaluate(): every window is a full forward pass; TTT adds epochs x 3 x forward over the
    whole sequences of every chunk but the last."""
    per_seq = seq_len * sum(tg.forward_flops_per_token(h, seq_len))
    total = len(tg.window_ends(n, seq_len, stride)) * per_seq
    if ttt:
        n_chunks = math.ceil(n / h.ttt_chunk_tokens)
        total += (n_chunks - 1) * (h.ttt_chunk_tokens // seq_len) * h.ttt_epochs * 3 * per_seq
    return total


def cpu_rows(tokens: int):
    h = tg.Hyperparameters.from_env({**PROXY, "DATA_PATH": str(DATA), "TOKENIZER_PATH": str(TOKENIZER),
                                     "TTT_CHUNK_TOKENS": str(16 * int(PROXY["TRAIN_SEQ_LEN"]))})
    sp, _, val_files = tg.check_inputs(h)
    full = tg.load_validation(h, sp, val_files, CPU.device)
    val = tg.make_validation(full.tokens[: tokens + 1], full.luts, h.train_seq_len)
    T = h.train_seq_len
    print(f"\nCPU proxy: {val.num_targets:,} targets, window {T}, {torch.get_num_threads()} threads\n"
          "| evaluator | scored tokens/s | model GFLOP/s | val_bpb (untrained model) |\n|---|---|---|---|")
    for name, stride, ttt in (("plain", T, False), ("sliding, stride 64", 64, False), ("legal TTT, stride 64", 64, True)):
        torch.manual_seed(0)
        model = tg.build_model(h, CPU, sp.bos_id(), qat=False)
        trainer = tg.ScoreFirstTTT(h, CPU, model, model) if ttt else None
        t0 = time.perf_counter()
        r = tg.evaluate(h, CPU, model, val, tg.Windows(T, stride, h.eval_batch_seqs), ttt=trainer)
        s = time.perf_counter() - t0
        flops = eval_flops(h, val.num_targets, T, stride, ttt)
        print(f"| {name} | {r.tokens / s:,.0f} | {flops / s / 1e9:.1f} | {r.val_bpb:.4f} |")


def projection():
    h = tg.Hyperparameters()
    T, gpus = h.eval_len, 8 * H100_BF16_FLOPS
    train_flops = 3 * RECORD_TRAIN_TOKENS * sum(tg.forward_flops_per_token(h, h.train_seq_len))
    mfu = {"train": train_flops / RECORD_TRAIN_STEP_S / gpus,
           "sliding": eval_flops(h, VAL_TARGETS, T, 64, False) / RECORD_SLIDING_S / gpus,
           "ttt": eval_flops(h, VAL_TARGETS, T, 64, True) / RECORD_TTT_S / gpus}
    print(f"\nRecords' achieved MFU on 8xH100 (this model's FLOPs / their times): training {mfu['train']:.1%} "
          f"(#1019 step), sliding eval {mfu['sliding']:.1%} (#1019), legal TTT {mfu['ttt']:.1%} (#549)")
    print(f"\nDefault configuration, {VAL_TARGETS:,} targets, window {T}, on 8xH100\n"
          "| evaluator | windows | PFLOP | at sliding-eval MFU | at training MFU |\n|---|---|---|---|---|")
    total = {}
    for name, stride, ttt in (("plain (round trip)", T, False), ("sliding, stride 64", 64, False),
                              ("legal TTT, stride 64", 64, True)):
        flops = eval_flops(h, VAL_TARGETS, T, stride, ttt)
        at = mfu["ttt"] if ttt else mfu["sliding"]
        total[name] = flops / (at * gpus)
        print(f"| {name} | {len(tg.window_ends(VAL_TARGETS, T, stride)):,} | {flops / 1e15:.1f} | "
              f"{total[name]:.0f} s{' (TTT MFU)' if ttt else ''} | {flops / (mfu['train'] * gpus):.0f} s |")
    evals = sum(total.values())
    print(f"\nRound trip + sliding + TTT: about {evals:.0f} s of the 600 s evaluation budget, before the "
          "export (quantization, pruning, compression) and the artifact load, which the time ledger adds.")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32_768, help="validation targets scored on CPU")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_sample()
    cpu_rows(args.tokens)
    projection()


if __name__ == "__main__":
    main()
