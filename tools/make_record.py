"""Build a record folder (records/track_10min_16mb/<date>_<name>/) from the run summaries of a few seeds.

    python3 tools/make_record.py --name MyIdea --author "A. Person" --github-id aperson \
        --blurb "What changed and why" --sota-val-loss 1.8822 logs/seed1.json logs/seed2.json logs/seed3.json

Each summary is the logs/<RUN_ID>.json that train_gpt.py writes; its log is the .txt next to it. Everything is
checked before anything is written, because a record PR that breaks a rule (size, time, mixed code or configs)
is rejected by the reviewers anyway, and is easier to fix here. Refusals print one line and exit with code 2.
The folder is assembled in a temporary directory next to the target and renamed into place, so a failure never
leaves a half-made record behind.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # stats.py, also when imported from elsewhere
from stats import improvement_test, mean, sample_std  # noqa: E402

FORMAT = "parameter-golf-run-summary/1"
CAP_BYTES = 16_000_000  # code + compressed model, decimal
BUDGET_MS = 600_000  # each of training and evaluation, on 8xH100
REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO_ROOT / "requirements.txt"
DEFAULT_OUT = Path("records") / "track_10min_16mb"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a folder name, never a path

# The summary fields this tool reads, with their types: a file lacking one is "not this format".
NUMBER = (int, float)
SCHEMA = {
    "seed": int, "world_size": int, "config": dict, "env": dict, "config_sha256": str, "steps": int,
    "train_ms": NUMBER, "eval_ms": NUMBER, "stages": dict, "code.sha256": str, "code.counted": str,
    "code.source_sha256": str, "code.source_bytes": int,
    "score.source": str, "score.val_loss": NUMBER, "score.val_bpb": NUMBER,
    "artifact.code_bytes": int, "artifact.model_bytes": int, "artifact.total_bytes": int,
    "devices.type": str, "devices.count": int,
    "data.variant": str, "data.train_shards": int, "data.train_full_shards": int, "data.val_tokens": int,
    "data.tokenizer_sha256": str,
}
RECORD_DEVICES = 8  # the track's hardware: 8xH100 SXM, one CUDA device per rank
# The published data of each variant, as the maintainers checked it (PR #2146 audited train_shards and val_tokens):
# training shards of 10^8 tokens (every one but the last full), and the validation tokens scored at sequence
# length 2048. A local CaseOps build with a 10,000-document validation split (9,662,464 tokens) or 10^7-token
# shards (about 1,500 of them) is not the canonical data, and PR #2127 found its training split holding 80% of
# the scored documents. sp4096/sp8192: 80 shards or all that the community repo has (143/128).
CANONICAL_DATA = {
    "sp1024": ((80,), (62_021_632,)),
    "sp4096": ((80, 143), (45_508_608,)),
    "sp8192": ((80, 128), (40_540_160,)),
    "caseops": ((80,), (47_851_520, 47_853_343)),  # truncated to whole sequences, or with the tail (PR #2014)
}


class Refusal(Exception):
    """A reason not to build the record; main() prints it as one line and exits with code 2."""


@dataclass
class Run:
    path: Path  # the summary
    log: Path  # the log next to it
    s: dict  # the summary's content

    @property
    def seed(self) -> int:
        return self.s["seed"]


def _get(d: dict, dotted: str):
    """d["a"]["b"] for "a.b"; KeyError when any level is missing or not a dict."""
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            raise KeyError(dotted)
        d = d[key]
    return d


def load_run(path: Path) -> Run:
    """Read one summary and locate its log, refusing anything that is not a complete run of this format."""
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Refusal(f"{path}: run summary not found")
    except (OSError, UnicodeDecodeError) as e:
        raise Refusal(f"{path}: cannot read the run summary ({e})")
    except json.JSONDecodeError as e:
        raise Refusal(f"{path}: not a run summary, invalid JSON ({e})")
    if not isinstance(s, dict) or s.get("format") != FORMAT:
        found = s.get("format") if isinstance(s, dict) else type(s).__name__
        raise Refusal(f"{path}: not a run summary of format {FORMAT!r} (found {found!r})")
    for key, kind in SCHEMA.items():
        try:
            value = _get(s, key)
        except KeyError:
            raise Refusal(f"{path}: not a complete {FORMAT} summary, {key!r} is missing")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise Refusal(f"{path}: not a valid {FORMAT} summary, {key!r} has the wrong type")
    log = path.with_suffix(".txt")
    if not log.is_file():
        raise Refusal(f"{path}: its log {log} is missing")
    with open(log, "rb") as f:  # train_gpt.py starts its log with the source it ran
        head = f.read(s["code"]["source_bytes"])
    if hashlib.sha256(head).hexdigest() != s["code"]["source_sha256"]:
        raise Refusal(f"{log}: does not start with the source its summary names (code.source_sha256): "
                      "not the log of this run")
    return Run(path, log, s)


def check_data(r: Run, non_record: bool):
    """A record runs on the canonical data of its variant (CANONICAL_DATA); --non-record allows any."""
    data = r.s["data"]
    variant, shards, full, val = data["variant"], data["train_shards"], data["train_full_shards"], data["val_tokens"]
    if non_record:
        return
    if variant not in CANONICAL_DATA:
        raise Refusal(f"{r.path}: seed {r.seed} ran on data of variant {variant!r}, which has no canonical "
                      f"fingerprint ({', '.join(CANONICAL_DATA)}; --non-record allows it)")
    train_ok, val_ok = CANONICAL_DATA[variant]
    if shards not in train_ok or full < shards - 1 or val not in val_ok:
        raise Refusal(f"{r.path}: seed {r.seed} ran on data that is not the canonical {variant} data: "
                      f"train_shards:{shards} ({full} of 10^8 tokens) val_tokens:{val}, expected train_shards "
                      f"{' or '.join(map(str, train_ok))} of 10^8 tokens and val_tokens "
                      f"{' or '.join(map(str, val_ok))} (a local build? --non-record allows it)")


def check_runs(runs: list[Run], script: Path, non_record: bool) -> bytes:
    """The rules, one refusal per broken one; returns the script's bytes, which must be the code every run ran."""
    for r in runs:
        check_data(r, non_record)
        total = r.s["artifact"]["total_bytes"]
        if total > CAP_BYTES:
            raise Refusal(f"{r.path}: seed {r.seed} artifact is {total:,} bytes, over the {CAP_BYTES:,}-byte cap")
        devices = r.s["devices"]
        if (devices["type"], devices["count"]) != ("cuda", RECORD_DEVICES) and not non_record:
            raise Refusal(f"{r.path}: seed {r.seed} ran on {devices['count']} {devices['type']} device(s) "
                          f"({r.s.get('device', '?')}); a record needs {RECORD_DEVICES} CUDA devices, 8xH100 SXM "
                          "(--non-record allows it, for a non-record submission)")
        for key, what in (("train_ms", "training"), ("eval_ms", "evaluation")):
            if r.s[key] > BUDGET_MS and not non_record:
                raise Refusal(f"{r.path}: seed {r.seed} {what} took {r.s[key] / 1000:.1f}s, over the "
                              f"{BUDGET_MS // 1000}s limit (--non-record allows it, for a non-record submission)")
    seen: dict[int, Run] = {}
    for r in runs:
        if r.seed in seen:
            raise Refusal(f"{r.path}: seed {r.seed} appears twice (also in {seen[r.seed].path})")
        seen[r.seed] = r
    first = runs[0]
    for r in runs[1:]:
        if r.s["code"]["sha256"] != first.s["code"]["sha256"]:
            raise Refusal(f"{r.path}: seed {r.seed} ran different code than seed {first.seed} ({first.path}): "
                          f"code.sha256 {r.s['code']['sha256'][:12]}... != {first.s['code']['sha256'][:12]}...")
        if r.s["data"] != first.s["data"]:
            diff = sorted(k for k in r.s["data"] if r.s["data"][k] != first.s["data"].get(k))
            raise Refusal(f"{r.path}: seed {r.seed} ran on different data than seed {first.seed} ({first.path}): "
                          f"{', '.join(diff)} differ")
        if r.s["config_sha256"] != first.s["config_sha256"]:
            raise Refusal(f"{r.path}: seed {r.seed} ran a different configuration than seed {first.seed} "
                          f"({first.path}): config_sha256 differs")
    try:
        code = script.read_bytes()
    except OSError as e:
        raise Refusal(f"{script}: cannot read the script ({e.strerror or e}); --script names the file the runs ran")
    digest = hashlib.sha256(code).hexdigest()
    if digest != first.s["code"]["sha256"]:
        raise Refusal(f"{script}: sha256 {digest[:12]}... is not the code the runs ran "
                      f"(code.sha256 {first.s['code']['sha256'][:12]}... in {first.path})")
    return code


def submission(runs: list[Run], args) -> dict:
    """submission.json: the challenge's fields (means over seeds, the largest total) plus every seed's numbers."""
    losses = [r.s["score"]["val_loss"] for r in runs]
    bpbs = [r.s["score"]["val_bpb"] for r in runs]
    return {
        "author": args.author, "github_id": args.github_id, "name": args.name, "blurb": args.blurb,
        "date": args.date, "val_loss": mean(losses), "val_bpb": mean(bpbs),
        "val_loss_std": sample_std(losses), "val_bpb_std": sample_std(bpbs),  # null for a single seed
        "bytes_total": max(r.s["artifact"]["total_bytes"] for r in runs),
        "bytes_code": runs[0].s["artifact"]["code_bytes"],
        "seeds": [{"seed": r.seed, "val_loss": r.s["score"]["val_loss"], "val_bpb": r.s["score"]["val_bpb"],
                   "bytes_total": r.s["artifact"]["total_bytes"], "bytes_model": r.s["artifact"]["model_bytes"],
                   "train_ms": r.s["train_ms"], "eval_ms": r.s["eval_ms"], "steps": r.s["steps"]} for r in runs],
        "non_record": args.non_record,
    }


def command(r: Run) -> str:
    """The command that reproduces one seed from inside the record folder: the run's non-default settings,
    then its seed and launcher."""
    env = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in r.s["env"].items())
    return (env + " " if env else "") + \
        f"SEED={r.seed} torchrun --standalone --nproc_per_node={r.s['world_size']} train_gpt.py"


def readme(runs: list[Run], args, sub: dict) -> str:
    """The record's README: what it is, a row per seed, the mean and spread, the statistics, how to rerun."""
    def f(x: float | None, digits: int = 5) -> str:
        return "n/a" if x is None else f"{x:.{digits}f}"

    stages = [k for k in runs[0].s["stages"] if any(r.s["stages"].get(k) for r in runs)]
    head = ["seed", "steps", "train s", "eval s", "val_loss", "val_bpb"]
    head += [f"{k} {m}" for k in stages for m in ("val_loss", "val_bpb")] + ["code bytes", "model bytes", "total bytes"]
    rows = []
    for r in runs:
        st = [(r.s["stages"].get(k) or {}) for k in stages]
        cells = [r.seed, r.s["steps"], f"{r.s['train_ms'] / 1000:.1f}", f"{r.s['eval_ms'] / 1000:.1f}",
                 f(r.s["score"]["val_loss"]), f(r.s["score"]["val_bpb"])]
        cells += [f(x.get(m)) for x in st for m in ("val_loss", "val_bpb")]
        cells += [f"{r.s['artifact'][k]:,}" for k in ("code_bytes", "model_bytes", "total_bytes")]
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    kind = "Non-record submission" if args.non_record else "Record submission"
    first = runs[0].s
    out = [
        f"# {args.name}", "", args.blurb, "",
        f"{kind} to the 10 min / 16 MB track by {args.author} (@{args.github_id}), {args.date}.", "",
        "## Results", "",
        f"val_loss and val_bpb are each run's official score ({first['score']['source']}); the other columns are "
        "the stages of the run (pre_quant_raw: the trained weights, averaged: after weight averaging, "
        "roundtrip: the compressed artifact decoded, sliding_window / doc_window / legal_ttt: the final evaluators). "
        f"Times are the charged training and evaluation time (limit {BUDGET_MS // 1000} s each); "
        f"bytes are code + compressed model (cap {CAP_BYTES:,}).", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows, "",
        f"Mean over {len(runs)} seed(s): val_loss {f(sub['val_loss'], 6)} (sample std {f(sub['val_loss_std'], 6)}), "
        f"val_bpb {f(sub['val_bpb'], 6)} (sample std {f(sub['val_bpb_std'], 6)}). "
        f"Largest total: {sub['bytes_total']:,} bytes.", "",
    ]
    if args.sota_val_loss is not None:
        test = improvement_test([r.s["score"]["val_loss"] for r in runs], args.sota_val_loss)
        out += ["## Statistics", "", "```text", test.statement(), "```", ""]
    out += [
        "## Reproduce", "",
        "From inside this folder (the data and tokenizer paths are those of the original runs), one line per seed:",
        "", "```bash", *(command(r) for r in runs), "```", "",
        "## Files", "",
        f"- `train_gpt.py`: the exact code that ran (sha256 `{first['code']['sha256']}`, "
        f"{first['artifact']['code_bytes']:,} bytes counted, {first['code']['counted']} form)",
        *(f"- `train_seed{r.seed}.log`: the log of seed {r.seed}" for r in runs),
        "- `submission.json`: the summary above, machine-readable",
        "- `requirements.txt`: the Python packages", "",
        "Ran on " + ", ".join(sorted({f"{r.s['world_size']}x {r.s.get('device', '?')}" for r in runs})) + " with " +
        ", ".join(f"{k} {v}" for k, v in (first.get("versions") or {}).items() if v) + ".", "",
    ]
    return "\n".join(out)


def build(runs: list[Run], args, code: bytes, target: Path):
    """Write the folder into a temporary sibling, then rename it into place; on any failure remove it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        sub = submission(runs, args)
        (tmp / "submission.json").write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme(runs, args, sub), encoding="utf-8")
        (tmp / "train_gpt.py").write_bytes(code)
        for r in runs:
            shutil.copyfile(r.log, tmp / f"train_seed{r.seed}.log")
        shutil.copyfile(REQUIREMENTS, tmp / "requirements.txt")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a record folder is an ordinary one
        if target.exists():  # appeared while we were writing
            raise Refusal(f"{target}: already exists")
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def date_arg(text: str) -> str:
    """A YYYY-MM-DD date (validated, since it becomes part of the folder name)."""
    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="make_record.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="short name; the folder is <date>_<name>")
    ap.add_argument("--author", required=True)
    ap.add_argument("--github-id", required=True)
    ap.add_argument("--blurb", required=True, help="one paragraph: what the submission does")
    ap.add_argument("--sota-val-loss", type=float, help="current record's val_loss: adds the significance test")
    ap.add_argument("--date", type=date_arg,
                    default=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
                    help="YYYY-MM-DD (default: today, UTC)")
    ap.add_argument("--script", type=Path, default=Path("train_gpt_packed.py"),
                    help="the code that ran (default: %(default)s, the packed file tools/run_seeds.sh runs; "
                         "train_gpt.py if the seeds ran it unpacked)")
    ap.add_argument("--non-record", action="store_true",
                    help="a non-record submission: allows training or evaluation over 600 s and hardware other "
                         "than 8 CUDA devices (nothing else)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="parent folder (default: %(default)s)")
    ap.add_argument("summaries", type=Path, nargs="+", metavar="RUN_SUMMARY_JSON", help="logs/<RUN_ID>.json")
    args = ap.parse_args(argv)
    if not NAME_RE.fullmatch(args.name):
        ap.error(f"--name {args.name!r}: use letters, digits, '.', '_' and '-' only (it becomes a folder name)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target = args.out / f"{args.date}_{args.name}"
    try:
        runs = sorted((load_run(p) for p in args.summaries), key=lambda r: r.seed)
        code = check_runs(runs, args.script, args.non_record)
        if not REQUIREMENTS.is_file():
            raise Refusal(f"{REQUIREMENTS}: missing (it is copied into the record)")
        if target.exists():
            raise Refusal(f"{target}: already exists; choose another --name or --date, or remove it")
        build(runs, args, code, target)
    except Refusal as e:
        print(f"make_record.py: refused: {e}", file=sys.stderr)
        return 2
    print(f"wrote {target}/ ({len(runs)} seeds: {', '.join(str(r.seed) for r in runs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
