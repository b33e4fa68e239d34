"""Training curves of one or more train_gpt.py logs, as one PNG with four panels.

    python3 tools/plot.py LOG [LOG ...] -o curves.png [--labels a,b,...]

Panels: training loss and val_bpb, each against the step and against training wall time (train_time, which
excludes compile warm-up and validation), so runs of different speed compare on both axes. The final score
(final_int8_zlib_roundtrip_exact) is marked at the end of each val_bpb curve and quoted in the legend.
matplotlib is optional and imported only to draw; parse_log() works without it.
"""

import argparse
import os
import re
import sys
from pathlib import Path

NUM = r"(-?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))"
# Anchored on both ends: the log opens with the trainer's source, whose f-strings must not parse as data.
STEP = re.compile(rf"^step:(\d+)/\d+ (?:train_loss:{NUM}|val_loss:{NUM} val_bpb:{NUM}) "
                  rf"train_time:(\d+)ms step_avg:{NUM}ms$")
FINAL = re.compile(rf"^final_int8_zlib_roundtrip_exact val_loss:{NUM} val_bpb:{NUM}$")


def parse_log(path) -> dict:
    """The curves of a log: train_{step,loss,time_s} and val_{step,loss,bpb,time_s} as parallel lists, and
    final = {"val_loss", "val_bpb"} from the last final score line (None if the run did not get there)."""
    run = {k: [] for k in ("train_step", "train_loss", "train_time_s", "val_step", "val_loss", "val_bpb",
                           "val_time_s")}
    run["final"] = None
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if m := STEP.match(line):
            step, seconds = int(m[1]), int(m[5]) / 1000
            if m[2] is not None:
                row = {"train_step": step, "train_loss": float(m[2]), "train_time_s": seconds}
            else:
                row = {"val_step": step, "val_loss": float(m[3]), "val_bpb": float(m[4]), "val_time_s": seconds}
            for k, v in row.items():
                run[k].append(v)
        elif m := FINAL.match(line):
            run["final"] = {"val_loss": float(m[1]), "val_bpb": float(m[2])}
    return run


def _matplotlib():
    """Figure and the Agg canvas, without pyplot: no GUI backend, no global figure state."""
    try:
        import matplotlib  # noqa: F401  (first, so a blocked or missing package fails here)
    except ImportError:
        raise ModuleNotFoundError("matplotlib is not installed: pip install matplotlib") from None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def plot(runs: list[tuple[str, dict]], out) -> None:
    """Draw (label, parse_log result) pairs into the PNG at out, written atomically."""
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(13, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    panels = [(axes[0, 0], "train_step", "train_loss", "step", "train loss"),
              (axes[0, 1], "train_time_s", "train_loss", "train time (s)", "train loss"),
              (axes[1, 0], "val_step", "val_bpb", "step", "val_bpb"),
              (axes[1, 1], "val_time_s", "val_bpb", "train time (s)", "val_bpb")]
    for i, (label, run) in enumerate(runs):
        color, final = f"C{i % 10}", run["final"]
        legend = label if final is None else f"{label} (final {final['val_bpb']:.4f})"
        for ax, x, y, _, _ in panels:
            ax.plot(run[x], run[y], color=color, label=legend, marker="." if len(run[x]) < 30 else None)
            if final is not None and y == "val_bpb" and run[x]:
                ax.plot(run[x][-1], final["val_bpb"], marker="*", markersize=12, color=color, linestyle="none")
    for ax, _, _, xlabel, ylabel in panels:
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    fig.suptitle("train_gpt.py runs (star: the official score, the final_int8_zlib_roundtrip_exact line)",
                 fontsize="medium")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/plot.py", description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", type=Path, metavar="LOG", help="train_gpt.py logs (logs/<RUN_ID>.txt)")
    p.add_argument("-o", "--output", type=Path, default=Path("curves.png"), help="PNG to write (curves.png)")
    p.add_argument("--labels", help="comma-separated legend labels, one per log (default: each log's file stem)")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [log.stem for log in args.logs]
    if len(labels) != len(args.logs):
        p.error(f"--labels has {len(labels)} labels for {len(args.logs)} logs")
    try:
        runs = [(label, parse_log(log)) for label, log in zip(labels, args.logs)]
        for log, (_, run) in zip(args.logs, runs):
            if not run["train_step"] and not run["val_step"]:
                raise ValueError(f"{log}: no step lines (is it a train_gpt.py log?)")
        plot(runs, args.output)
    except (OSError, ValueError, ModuleNotFoundError) as e:
        print(f"plot.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({len(runs)} run{'s' * (len(runs) != 1)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
