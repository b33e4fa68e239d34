"""The final evaluators compared on the proxy-trained frontier preset (val_bpb and CPU time), and their projected
8xH100 time on a stand-in for the official validation set.

    OMP_NUM_THREADS=1 python3 benchmarks/eval_proxy.py [--artifact PATH] [--save PATH] [--docs N] [--rows I ...]
                                                        [--only proxy|projection]

1. Proxy table. The frontier preset at the proxy size (benchmarks/frontier_proxy.py's configs(300)["frontier"]
   over proxy.py's SHAPE: 4 layers, d=128, sequence 256, sp1024) is trained once by train_gpt.py in a subprocess,
   300 steps, seed 1337, with its own final evaluation reduced to the plain one (TTT_ENABLED=0, EVAL_DOCS=0,
   NGRAM_TILT_ENABLED=0, TTT_MODE at its default) and GPTQ calibration on 16 training batches as the preset's
   (16 x 8,192 tokens: the preset's 12,582,912 would take most of an hour on CPU); the artifact it exports is
   copied to --save (printed), and --artifact PATH skips the training and reuses one. The artifact is loaded
   as score_artifact loads it (decode_artifact, build_model(qat=False), load_state_dict), a fresh copy for every
   TTT row, and scored on the sample's whole validation shard (100 documents, EVAL_INCLUDE_TAIL=1) by: the
   plain evaluator (stride = window),
   the stream sliding window at stride 64, document windows, document windows + the n-gram tilt, per-document
   LoRA TTT without phases, with one phase, with one phase + tilt (the frontier evaluator), and for reference the
   seed stack's chunked SGD TTT on stream windows at stride 64 (its defaults: lr 0.002, 3 epochs, momentum 0.9).
   Knobs are the preset's (chunk 64, short steps 256:16,2000:32, batch 24, rank 80, no_qv, lr 1e-4 x 0.75, phase
   SGD lr 1e-3 for 1 epoch, tilt order 16 / threshold 0.8 / boost 2.625), except what must shrink with the proxy:
   - EVAL_SEQ_LEN 3072 -> 256, the proxy's training length (the windows, and the LoRA path's context cap);
   - PHASED_TTT_PREFIX_DOCS 2500 -> 5% of the validation documents (the records': 2,500 of ~50,000), at least
     one batch (TTT_BATCH_SIZE), since a phase boundary falls after whole batches;
   - TTT_CHUNK_TOKENS 32768 -> 4096: the same 16 windows a chunk as the seed stack's 32768 / 2048 (32768 would
     leave the phase SGD's ~30k tokens one chunk, which it does not train on, and chunk TTT 4 chunks in all).
   Seconds are wall time on this CPU (one thread with OMP_NUM_THREADS=1); the tilt rows include the n-gram
   hints' time; tokens/s = scored targets / seconds. Nothing is tuned. --docs N scores the first N documents
   only (every row the same ones; the phase prefix from N): the LoRA rows' cost is set by each batch's longest
   document, 285 adapter steps of up to 24 x 256 tokens on all 100 (the 8,886-token document alone 139), 99 on
   the first 40 (longest 4,418); --rows runs some rows (several processes can share a machine's cores).
2. 8xH100 projection: train_gpt.eval_costs (model FLOPs, projected seconds) of each evaluator the frontier
   preset (the defaults) and the seed stack (configs/seed_stack.env) run, on a stand-in validation stream: the sample's
   400 documents, each after a BOS, encoded with the preset's tokenizer (frontier: CaseOps SP8192, data/caseops.py
   encode before SentencePiece; seed stack: sp1024), tiled to the official token counts. Then PR #2014's LoRA
   settings projected from PR #2140's measured anchor, against PR #2014's own logged time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

# proxy first: it puts the repository root and data/ on sys.path
from proxy import CPU, DATA, ROOT, SAMPLE, SHAPE, TOKENIZER, config, ensure_sample, train_run
from frontier_proxy import configs
import caseops
import train_gpt as tg

STEPS, SEED, EVAL_LEN = 300, 1337, 256
PREFIX_FRAC = 2_500 / 50_000  # PR #2014's phase prefix, as a fraction of the official validation documents
CHUNK_TOKENS = 16 * EVAL_LEN  # the seed stack's 32768-token chunks hold 16 of its 2048-token windows
SEED_STACK_TTT = dict(TTT_ENABLED="1", TTT_MODE="chunks", TTT_LR="0.002", TTT_EPOCHS="3")  # docs/presets.md
CASEOPS_TOKENIZER = ROOT / "data" / "sample" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
OFFICIAL_TOKENS = {"frontier": 47_853_344, "seed stack": 62_021_633}  # CaseOps (PR #2014's tail count); sp1024
OFFICIAL_DOCS = 50_000  # about; 47,853,343 CaseOps targets
PR2014_LORA = dict(TTT_CHUNK_SIZE="48", TTT_SHORT_SCORE_FIRST_STEPS="256:8,2000:24")
PR2014_TTT_S = (490.0, 572.0)  # its logged LoRA TTT times: lowest, highest


def train_env() -> dict[str, str]:
    """The proxy frontier preset as trained here: its own final evaluation only the plain one."""
    env = {k: v for k, v in {**configs(STEPS)["frontier"], **SHAPE}.items() if k != "TTT_MODE"}
    env.update(EVAL_SEQ_LEN=str(EVAL_LEN), EVAL_STRIDE=str(EVAL_LEN), EVAL_INCLUDE_TAIL="1")
    return env


def proxy_h(**extra: str) -> tg.Hyperparameters:
    env = {**train_env(), "ITERATIONS": str(STEPS), "SEED": str(SEED), "DATA_PATH": str(DATA),
           "TOKENIZER_PATH": str(TOKENIZER), **extra}
    return tg.Hyperparameters.from_env({k: v for k, v in env.items() if v is not None})


def train_artifact(save: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = train_run("frontier", train_env(), STEPS, SEED, Path(tmp))
        save.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "logs" / "proxy.ptz", save)
    print(f"trained the proxy frontier preset: {STEPS} steps, seed {SEED}, pre-quant val_bpb {r['val_bpb']:.4f}, "
          f"{r['params']:,} parameters, {time.perf_counter() - t0:.0f} s; artifact saved: {save}", flush=True)
    return save


def proxy_table(artifact: Path, docs: int | None, only: list[int] | None):
    h = proxy_h()
    sp, _, val_files = tg.check_inputs(h)
    val = tg.load_validation(h, sp, val_files, CPU.device)
    all_docs = len(tg.doc_bounds(val.tokens, val.bos_id)) - 1
    if docs and docs < all_docs:  # the first `docs` documents: targets up to the next document's BOS
        cut = tg.doc_bounds(val.tokens, val.bos_id)[docs]
        val = tg.make_validation(val.tokens[: cut + 1], val.luts, val.seq_len, tail=True, bos_id=val.bos_id)
    state = tg.decode_artifact(artifact.read_bytes(), h, str(artifact))

    def fresh() -> tg.GPT:
        model = tg.build_model(h, CPU, sp.bos_id(), qat=False)
        model.load_state_dict(state, strict=True)
        return model.eval()

    lora = dict(TTT_ENABLED="1", TTT_MODE="lora")  # the chunk size is read by the phases only
    n_docs = len(tg.doc_bounds(val.tokens, val.bos_id)) - 1
    prefix = max(round(PREFIX_FRAC * n_docs), proxy_h(**lora).ttt_batch_size)
    t0 = time.perf_counter()
    hints = tg.ngram_hints(val.tokens, h.token_order, h.token_threshold)
    hints_s = time.perf_counter() - t0
    phased = dict(lora, TTT_CHUNK_TOKENS=str(CHUNK_TOKENS), PHASED_TTT_PREFIX_DOCS=str(prefix))
    model = fresh()  # the windows do not change the weights
    plain, stride = tg.Windows(EVAL_LEN, EVAL_LEN, h.eval_batch_seqs), tg.Windows(EVAL_LEN, 64, h.eval_batch_seqs)
    rows = {  # name: (hyperparameters, run(h), extra seconds)
        "plain (stride 256)": (h, lambda h: tg.evaluate(h, CPU, model, val, plain), 0.0),
        "stream sliding window, stride 64": (h, lambda h: tg.evaluate(h, CPU, model, val, stride), 0.0),
        "document windows (stride 256)": (h, lambda h: tg.evaluate(h, CPU, model, val, plain, docs=True), 0.0),
        "document windows + n-gram tilt": (proxy_h(NGRAM_TILT_ENABLED="1"),
                                           lambda h: tg.evaluate(h, CPU, model, val, plain, docs=True, hints=hints),
                                           hints_s),
        "LoRA TTT, no phases": (proxy_h(**lora, PHASED_TTT_NUM_PHASES="0"), None, 0.0),
        f"LoRA TTT, 1 phase ({prefix} prefix docs)": (proxy_h(**phased), None, 0.0),
        "LoRA TTT, 1 phase + n-gram tilt (frontier evaluator)": (proxy_h(**phased, NGRAM_TILT_ENABLED="1"), None,
                                                                   hints_s),
        "chunked SGD TTT (seed stack's), stride 64": (
            proxy_h(**SEED_STACK_TTT, TTT_CHUNK_TOKENS=str(CHUNK_TOKENS)), None, 0.0),
    }
    print(f"\nProxy frontier preset ({artifact}), validation: {val.num_targets:,} targets, {val.byte_count:,} bytes, "
          f"{n_docs} of its {all_docs} documents; window {EVAL_LEN}, {torch.get_num_threads()} thread(s); n-gram hints "
          f"{int((hints >= 0).sum()):,}/{len(hints):,} targets hinted in {hints_s:.1f} s\n"
          "| evaluator | val_bpb | Δ vs plain | seconds on this CPU | scored tokens/s |\n|---|---|---|---|---|",
          flush=True)
    base_bpb = None
    for i, (name, (hr, run, extra_s)) in enumerate(rows.items(), 1):
        if only and i > 1 and i not in only:  # the plain row always runs: the others' Δ
            continue
        if run is None and hr.ttt_mode == "lora":
            m, tilt = fresh(), hints if hr.ngram_tilt_enabled else None
            run = lambda hr, m=m, tilt=tilt: tg.lora_ttt(hr, CPU, m, m, val, hints=tilt)  # noqa: E731
        elif run is None:
            m = fresh()
            run = lambda hr, m=m: tg.evaluate(  # noqa: E731
                hr, CPU, m, val, stride, ttt=tg.ScoreFirstTTT(hr, CPU, m, m))
        torch.manual_seed(SEED)
        t0 = time.perf_counter()
        r = run(hr)
        s = time.perf_counter() - t0 + extra_s
        base_bpb = r.val_bpb if base_bpb is None else base_bpb
        delta = "–" if name.startswith("plain") else f"{r.val_bpb - base_bpb:+.4f}"
        print(f"| {name} | {r.val_bpb:.4f} | {delta} | {s:.1f} | {r.tokens / s:,.0f} |", flush=True)


def stand_in(tokenizer: Path, case_ops: bool, tokens: int) -> tuple[np.ndarray, int, float]:
    """The sample's documents, each after a BOS, tiled to `tokens`; (stream, bos id, mean tokens per document)."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    texts = [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines()]
    docs = [[sp.bos_id()] + sp.encode(caseops.encode(t) if case_ops else t) for t in texts]
    stream = np.concatenate(docs).astype(np.uint16)
    return np.resize(stream, tokens), sp.bos_id(), len(stream) / len(docs)


def projection():
    frontier, seed = tg.Hyperparameters(), tg.Hyperparameters.from_env(config("seed_stack"))
    seed_ttt = tg.Hyperparameters.from_env({**config("seed_stack"), **SEED_STACK_TTT})
    streams = {"frontier": stand_in(CASEOPS_TOKENIZER, True, OFFICIAL_TOKENS["frontier"]),
               "seed stack": stand_in(TOKENIZER, False, OFFICIAL_TOKENS["seed stack"])}
    print(f"\n8xH100 projection: train_gpt.eval_costs (LoRA TTT and hints at PR #2140's measured times, the "
          f"others at EVAL_MFU {tg.EVAL_MFU} of 8 x "
          f"{tg.H100_BF16_FLOPS / 1e12:.1f} bf16 TFLOP/s; stand-in validation: the sample's 400 documents tiled "
          f"(frontier {OFFICIAL_TOKENS['frontier']:,} CaseOps SP8192 tokens, {streams['frontier'][2]:.0f} per "
          f"document; seed stack {OFFICIAL_TOKENS['seed stack']:,} sp1024 tokens, {streams['seed stack'][2]:.0f} "
          "per document)\n| configuration | evaluator | PFLOP | projected s |\n|---|---|---|---|")
    vals = {}
    for label, h, key in (("frontier (the defaults)", frontier, "frontier"), ("seed stack", seed, "seed stack"),
                          ("seed stack + its chunked TTT", seed_ttt, "seed stack")):
        tokens, bos, _ = streams[key]
        val = vals[key] = tg.ValidationData(tokens, None, h.train_seq_len, 0, bos_id=bos)
        costs = tg.eval_costs(h, val)
        for name, (flops, s) in costs.items():
            print(f"| {label} | {name} | {flops / 1e15:.1f} | {s:.0f} |")
        print(f"| {label} | **total** | {sum(f for f, _ in costs.values()) / 1e15:.1f} | "
              f"**{sum(s for _, s in costs.values()):.0f}** |")
    h2014 = tg.Hyperparameters.from_env({**config("frontier"), **PR2014_LORA, "NGRAM_TILT_ENABLED": "0"})
    projected = tg.eval_costs(h2014, vals["frontier"])["legal_ttt"][1]
    mean_doc = streams["frontier"][2]
    print(f"\nCross-check of the LoRA anchor (PR #2140's slowest seed, {tg.ANCHOR_TTT_S:.1f} s of LoRA TTT with the "
          f"defaults' evaluator): PR #2014's evaluator ({', '.join(f'{k}={v}' for k, v in PR2014_LORA.items())}, no "
          f"tilt), scaled from it by FLOPs on the stand-in, projects {projected:.0f} s; PR #2014 logged "
          f"{PR2014_TTT_S[0]:.0f}-{PR2014_TTT_S[1]:.0f} s.\n"
          f"The stand-in's documents average {mean_doc:.0f} tokens, the official set's about "
          f"{(OFFICIAL_TOKENS['frontier'] - 1) / OFFICIAL_DOCS:.0f} (47,853,343 targets in about 50,000 documents): "
          "the FLOP ratio depends on the document lengths (batch shapes, chunk steps, the phase prefix); on the "
          "official set a run projects its own.")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, help="a saved proxy artifact to evaluate (skips the training)")
    ap.add_argument("--save", type=Path, default=Path(tempfile.gettempdir()) / "eval_proxy" /
                    f"frontier_proxy_{STEPS}_{SEED}.ptz", help="where the trained artifact is kept")
    ap.add_argument("--docs", type=int, help="score the first DOCS validation documents only (default: all 100)")
    ap.add_argument("--rows", type=int, nargs="+", help="table rows to run, 1-8 (the plain row 1 always runs)")
    ap.add_argument("--only", choices=("proxy", "projection"), help="one part only")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.only != "projection":
        ensure_sample()
        proxy_table(args.artifact or train_artifact(args.save), args.docs, args.rows)
    if args.only != "proxy":
        projection()
    print(f"\neval_proxy: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
