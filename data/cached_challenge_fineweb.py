"""Download the published challenge data (token shards and tokenizers) from the Hugging Face Hub.

    python3 data/cached_challenge_fineweb.py [--variant sp1024|sp4096|sp8192|caseops] [--train-shards 80 | N]
        [--skip-manifest] [--with-docs]

Each variant lives in its own dataset repo (VARIANTS): sp1024 in the official one, sp4096 and sp8192 in the
community one of PR #1218/#1394, caseops (SP8192 on CaseOps-transformed text, PR #1729, the data of the final
records) in its author's, under the dataset name fineweb10B_sp8192_lossless_caps_caseops_v1_reserved. Any
other name is looked up as fineweb10B_<variant> in the official repo (e.g. byte260).

The manifest of the dataset repo (<prefix>/manifest.json) lists the datasets, one per tokenizer variant with its
shard counts, and the tokenizers. For the variant's dataset this fetches the tokenizer's files, every
validation shard (and, when the dataset lists val_bytes_glob, as CaseOps does, the byte sidecar of each:
fineweb_val_bytes_N.bin) and the first N training shards, mirroring the remote layout (minus the prefix) under
data/, the directory of this script:

    data/manifest.json
    data/tokenizers/fineweb_1024_bpe.model, ...
    data/datasets/fineweb10B_sp1024/fineweb_val_000000.bin, fineweb_train_000000.bin, ...

Files already present and complete (a shard whose header matches its size, a .model that loads, any other file
non-empty) are not fetched again; the manifest always is, unless --skip-manifest. --with-docs also fetches
docs_selected.jsonl, the selected FineWeb documents, and docs_selected.source_manifest.json.

Environment: MATCHED_FINEWEB_REPO_ID (default: the variant's repo), MATCHED_FINEWEB_REMOTE_ROOT_PREFIX
(default datasets). Exit status: 0 done, 1 a file could not be downloaded or stored, 2 bad arguments or manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import sentencepiece as spm
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import logging as hf_logging

DATA_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA_DIR.parent))
import train_gpt  # noqa: E402

PROG = Path(__file__).name
DEFAULT_REPO_ID, DEFAULT_PREFIX = "willdepueoai/parameter-golf", "datasets"  # the official names and layout
DEFAULT_TRAIN_SHARDS = 80
# variant -> (dataset repo, dataset name without "fineweb10B_"); other variants: (DEFAULT_REPO_ID, the variant)
VARIANTS = {
    "sp1024": (DEFAULT_REPO_ID, "sp1024"),
    "sp4096": ("kevclark/parameter-golf", "sp4096"),  # PR #1218
    "sp8192": ("kevclark/parameter-golf", "sp8192"),  # PR #1394
    "caseops": ("romeerp/parameter-golf-caseops-v1", "sp8192_lossless_caps_caseops_v1_reserved"),  # PR #1729
}
DOCS = ["docs_selected.jsonl", "docs_selected.source_manifest.json"]
TOKENIZER_FIELDS = ("model_path", "vocab_path", "path")
KIND_NAMES = {list: "a list", dict: "an object", str: "a string", int: "a non-negative integer"}

Fetch = Callable[[str, str], str]  # (repo id, path in the repo) -> local path of the downloaded file


class UsageError(ValueError):
    """Bad arguments or manifest (exit status 2)."""


class DownloadError(RuntimeError):
    """A file could not be downloaded or stored (exit status 1)."""


def hf_fetch(repo_id: str, remote_path: str) -> str:
    """Download one file of the dataset repo into the Hugging Face cache; return its cached path."""
    hf_logging.set_verbosity_error()  # its per-retry warnings would bury our one-line error
    subfolder, filename = posixpath.split(remote_path)
    return hf_hub_download(repo_id=repo_id, filename=filename, subfolder=subfolder or None, repo_type="dataset")


def is_complete(path: Path) -> bool:
    """Whether a local file can be used as is, judged from its content alone (no network)."""
    if not path.is_file():
        return False
    try:
        if path.suffix == ".bin":
            train_gpt.read_shard_header(str(path))
        elif path.suffix == ".model":
            spm.SentencePieceProcessor(model_file=str(path))
        else:
            return path.stat().st_size > 0
    except (ValueError, RuntimeError, OSError):  # bad shard header/size, unparsable model, unreadable file
        return False
    return True


def short_reason(e: BaseException) -> str:
    """The innermost exception of the chain on one line: huggingface_hub wraps transport failures in generic
    messages, while the root one says what happened (offline mode, connection refused, 404...)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def install(src: str, dest: Path) -> None:
    """Put the file src at dest: a hard link (no second copy of gigabytes of shards) or else a copy, made under a
    temporary name and renamed, so that an interrupted run never leaves a partial file under the final name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or no hard links there
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class Remote:
    repo_id: str
    prefix: str  # directory of the repo that data/ mirrors
    fetch: Fetch

    def download(self, rel: str, dest: Path) -> None:
        remote_path = posixpath.join(self.prefix, rel)
        # Any exception: huggingface_hub raises unrelated types (OSError, httpx or requests errors,
        # EntryNotFoundError...) depending on its version and the failure, all of which mean the same to the user.
        try:
            cached = os.path.realpath(self.fetch(self.repo_id, remote_path))  # the HF cache hands out symlinks
        except Exception as e:
            raise DownloadError(f"cannot download {remote_path} from {self.repo_id}: {short_reason(e)}") from None
        try:
            install(cached, dest)
        except OSError as e:
            raise DownloadError(f"cannot store {dest}: {e}") from None


def sync(remote: Remote, rel: str, data_dir: Path, refresh: bool = False) -> bool:
    """Make data_dir/rel a complete copy of the remote file, fetching it only if needed (always if refresh);
    return whether it was downloaded."""
    dest = data_dir / rel
    if not refresh:
        if is_complete(dest):
            print(f"present {rel}", flush=True)
            return False
        if dest.exists():
            print(f"incomplete {rel}, downloading it again", flush=True)
    remote.download(rel, dest)
    print(f"downloaded {rel}", flush=True)
    return True


# ---------------------------------------------------------------------------------------------------- manifest


def load_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable JSON manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise UsageError(f"{path}: not a JSON object")
    return manifest


def field(obj, key: str, kind: type, where: str, source: Path):
    """obj[key], checked to be of the given kind; where locates obj in the manifest (source) for the message."""
    value = obj.get(key) if isinstance(obj, dict) else None
    valid = isinstance(value, kind) and not (kind is int and (isinstance(value, bool) or value < 0))
    if not valid:
        raise UsageError(f"{source}: field {where + '.' if where else ''}{key} is missing or not {KIND_NAMES[kind]}")
    return value


def tokenizer_path(path: str, source: Path) -> str:
    """A tokenizer file's path relative to the prefix; a bare file name lives in tokenizers/."""
    p = PurePosixPath(path)
    if len(p.parts) == 1:
        p = "tokenizers" / p
    if not p.parts or p.is_absolute() or ".." in p.parts:
        raise UsageError(f"{source}: tokenizer path {path!r} leads outside the data directory")
    return str(p)


def tokenizer_files(manifest: dict, source: Path, name: str) -> list[str]:
    for i, entry in enumerate(field(manifest, "tokenizers", list, "", source)):
        if isinstance(entry, dict) and entry.get("name") == name:
            paths = [field(entry, key, str, f"tokenizers[{i}]", source)
                     for key in TOKENIZER_FIELDS if entry.get(key) is not None]
            if not paths:
                raise UsageError(f"{source}: tokenizers[{i}] ({name}) has none of the fields "
                                 f"{', '.join(TOKENIZER_FIELDS)}")
            return list(dict.fromkeys(tokenizer_path(p, source) for p in paths))
    raise UsageError(f"{source}: the dataset's tokenizer {name!r} is not among the manifest's tokenizers")


def plan(manifest: dict, source: Path, variant: str, train_shards: int) -> list[str]:
    """Paths, relative to the prefix, of the variant's tokenizer files, all its validation shards (and their byte
    sidecars) and its first train_shards training shards. Everything is checked here, before any download."""
    datasets = {field(d, "name", str, f"datasets[{i}]", source): (i, d)
                for i, d in enumerate(field(manifest, "datasets", list, "", source))}
    name = f"fineweb10B_{VARIANTS.get(variant, (None, variant))[1]}"
    if name not in datasets:
        available = sorted(n.removeprefix("fineweb10B_") for n in datasets if n.startswith("fineweb10B_"))
        raise UsageError(f"variant {variant!r} ({name}) is not in {source}; available: "
                         f"{', '.join(available) or 'none'}")
    i, dataset = datasets[name]
    stats = field(dataset, "stats", dict, f"datasets[{i}]", source)
    num_val = field(stats, "files_val", int, f"datasets[{i}].stats", source)
    num_train = field(stats, "files_train", int, f"datasets[{i}].stats", source)
    if train_shards > num_train:
        raise UsageError(f"--train-shards {train_shards}: {name} has only {num_train} training shards")
    files = tokenizer_files(manifest, source, field(dataset, "tokenizer_name", str, f"datasets[{i}]", source))
    files += [f"datasets/{name}/fineweb_val_{k:06d}.bin" for k in range(num_val)]
    if dataset.get("val_bytes_glob"):
        files += [f"datasets/{name}/fineweb_val_bytes_{k:06d}.bin" for k in range(num_val)]
    elif variant == "caseops":  # its val_bpb needs the sidecar (train_gpt.py refuses the data without it)
        raise UsageError(f"{source}: datasets[{i}] ({name}) lists no validation byte sidecar (val_bytes_glob)")
    files += [f"datasets/{name}/fineweb_train_{k:06d}.bin" for k in range(train_shards)]
    return files


# ---------------------------------------------------------------------------------------------------- command line


def shard_count(text: str) -> int:
    n = int(text)  # a ValueError becomes argparse's "invalid shard_count value"
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative")
    return n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="Environment: MATCHED_FINEWEB_REPO_ID (default: the variant's repo, " +
                                       ", ".join(f"{v}: {r}" for v, (r, _) in VARIANTS.items()) +
                                       f"), MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (default {DEFAULT_PREFIX}).")
    p.add_argument("shards", nargs="?", type=shard_count, metavar="N", help="same as --train-shards N")
    p.add_argument("--variant", default="sp1024",
                   help="sp1024 (default, official), sp4096, sp8192 (community), caseops (SP8192 CaseOps data of the "
                        "final records, with its validation byte sidecar), or another dataset of the official repo")
    p.add_argument("--train-shards", type=shard_count, metavar="N",
                   help=f"number of training shards to fetch, from the first (default {DEFAULT_TRAIN_SHARDS})")
    p.add_argument("--skip-manifest", action="store_true", help="use the local data/manifest.json as it is")
    p.add_argument("--with-docs", action="store_true", help="also fetch docs_selected.jsonl and its source manifest")
    a = p.parse_args(argv)
    if a.shards is not None and a.train_shards is not None:
        p.error("give the number of training shards once, as N or as --train-shards N")
    a.train_shards = next((n for n in (a.shards, a.train_shards) if n is not None), DEFAULT_TRAIN_SHARDS)
    return a


def main(argv: list[str] | None = None, fetch: Fetch = hf_fetch, data_dir: str | os.PathLike = DATA_DIR) -> int:
    a = parse_args(argv)
    data_dir = Path(data_dir)
    remote = Remote(os.environ.get("MATCHED_FINEWEB_REPO_ID", VARIANTS.get(a.variant, (DEFAULT_REPO_ID,))[0]),
                    os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_PREFIX).strip("/"), fetch)
    manifest_path = data_dir / "manifest.json"
    try:
        if not a.skip_manifest:
            sync(remote, "manifest.json", data_dir, refresh=True)  # the published file list may have changed
        elif not manifest_path.is_file():
            raise UsageError(f"--skip-manifest needs a local {manifest_path}; run once without --skip-manifest")
        files = plan(load_manifest(manifest_path), manifest_path, a.variant, a.train_shards)
        files += DOCS if a.with_docs else []
        downloaded = sum(sync(remote, rel, data_dir) for rel in files)
    except (UsageError, DownloadError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    print(f"{a.variant} ({remote.repo_id}): {len(files)} files in {data_dir}, {downloaded} downloaded, "
          f"{len(files) - downloaded} already present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
