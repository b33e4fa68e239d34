"""data/cached_challenge_fineweb.py against a fake Hub: a directory tree in tmp_path served by a stand-in fetch
(the real huggingface_hub is only exercised offline, in a subprocess)."""

import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from build_shards import write_shard
from conftest import ROOT, SP1024

import cached_challenge_fineweb as ccf

REPO = "willdepueoai/parameter-golf"
SP_FILES = ["tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab",
            "datasets/fineweb10B_sp1024/fineweb_val_000000.bin"] + \
           [f"datasets/fineweb10B_sp1024/fineweb_train_{k:06d}.bin" for k in range(3)]


def manifest_dict():
    return {
        "version": 1,
        "datasets": [
            {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "stats": {"files_train": 3, "files_val": 1}},
            {"name": "fineweb10B_byte260", "tokenizer_name": "pure_byte_260",
             "stats": {"files_train": 1, "files_val": 1}},
        ],
        "tokenizers": [
            {"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
             "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
            {"name": "pure_byte_260", "path": "fineweb_pure_byte_260.json"},  # a bare name: lives in tokenizers/
        ],
    }


class FakeHub:
    """Serves files of a directory tree the way hf_hub_download does: as a symlink in a cache directory, and
    records every (repo id, remote path) asked for."""

    def __init__(self, root, cache):
        self.root, self.cache, self.calls = root, cache, []
        self.snapshots = itertools.count()

    def __call__(self, repo_id, remote_path):
        self.calls.append((repo_id, remote_path))
        source = self.root / remote_path
        if not source.is_file():
            raise FileNotFoundError(f"404 Entry Not Found: {remote_path}")
        link = self.cache / f"snapshot{next(self.snapshots)}" / source.name
        link.parent.mkdir(parents=True)
        link.symlink_to(source)
        return str(link)

    def paths(self):
        return [path for _, path in self.calls]


def make_remote(tmp_path, prefix="datasets", manifest=None):
    base = tmp_path / "remote" / prefix
    sp, byte = base / "datasets" / "fineweb10B_sp1024", base / "datasets" / "fineweb10B_byte260"
    sp.mkdir(parents=True)
    byte.mkdir(parents=True)
    write_shard(sp / "fineweb_val_000000.bin", np.arange(300) % 1024)
    for k in range(3):
        write_shard(sp / f"fineweb_train_{k:06d}.bin", np.full(100 + k, 7 * k))
    write_shard(byte / "fineweb_val_000000.bin", np.arange(50))
    write_shard(byte / "fineweb_train_000000.bin", np.arange(60))
    (base / "tokenizers").mkdir()
    shutil.copy(SP1024, base / "tokenizers" / "fineweb_1024_bpe.model")
    (base / "tokenizers" / "fineweb_1024_bpe.vocab").write_text("<unk>\t0\n<s>\t0\n")
    (base / "tokenizers" / "fineweb_pure_byte_260.json").write_text('{"vocab_size": 260}')
    (base / "docs_selected.jsonl").write_text('{"text": "hello"}\n')
    (base / "docs_selected.source_manifest.json").write_text('{"source": "fineweb"}')
    (base / "manifest.json").write_text(json.dumps(manifest or manifest_dict()))
    return FakeHub(tmp_path / "remote", tmp_path / "hf_cache"), base


@pytest.fixture
def hub(tmp_path):
    return make_remote(tmp_path)


def run(capsys, data, hub, *argv):
    rc = ccf.main(list(argv), fetch=hub, data_dir=data)
    out, err = capsys.readouterr()
    return rc, out, err


def local_files(data):
    return sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file())


def test_downloads_the_manifest_tokenizer_and_shards_with_identical_bytes(tmp_path, capsys, hub):
    fake, base = hub
    data = tmp_path / "data"
    rc, out, err = run(capsys, data, fake, "--train-shards", "3")
    assert rc == 0 and err == ""
    assert local_files(data) == sorted(["manifest.json"] + SP_FILES)
    for rel in local_files(data):
        local = data / rel
        assert not local.is_symlink() and local.read_bytes() == (base / rel).read_bytes()
        assert os.path.samefile(local, base / rel)  # hard-linked from the cache, not a second copy
    assert fake.calls == [(REPO, f"datasets/{rel}") for rel in ["manifest.json"] + SP_FILES]
    assert out.splitlines()[:-1] == [f"downloaded {rel}" for rel in ["manifest.json"] + SP_FILES]
    assert "6 downloaded" in out.splitlines()[-1]
    assert not list(data.rglob("*.tmp*"))


def test_default_is_80_train_shards(tmp_path, capsys, hub):
    rc, out, err = run(capsys, tmp_path / "data", hub[0])
    assert rc == 2 and "--train-shards 80" in err and "only 3 training shards" in err


def test_env_overrides_repo_id_and_prefix_but_not_the_local_layout(tmp_path, capsys, monkeypatch):
    fake, base = make_remote(tmp_path, prefix="mirror/v2")
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/mirror")
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "mirror/v2")
    data = tmp_path / "data"
    rc, out, err = run(capsys, data, fake, "--train-shards", "1")
    assert rc == 0, err
    expected = ["manifest.json"] + SP_FILES[:4]
    assert fake.calls == [("someone/mirror", f"mirror/v2/{rel}") for rel in expected]
    assert local_files(data) == sorted(expected)


def test_a_second_run_fetches_nothing_but_the_manifest(tmp_path, capsys, hub):
    fake, _ = hub
    data = tmp_path / "data"
    assert run(capsys, data, fake, "2")[0] == 0
    fake.calls.clear()
    rc, out, err = run(capsys, data, fake, "2")
    assert rc == 0 and err == ""
    assert fake.paths() == ["datasets/manifest.json"]
    assert out.splitlines()[1:-1] == [f"present {rel}" for rel in SP_FILES[:5]]
    assert "0 downloaded, 5 already present" in out


def test_incomplete_local_files_are_fetched_again(tmp_path, capsys, hub):
    fake, base = hub
    data = tmp_path / "data"
    assert run(capsys, data, fake, "3")[0] == 0
    shard, model = data / SP_FILES[4], data / SP_FILES[0]
    content = shard.read_bytes()
    shard.unlink()  # unlink first: the local file is a hard link of the "remote" one
    shard.write_bytes(content[:-2])  # one token short: the header no longer matches the size
    model.unlink()
    model.write_bytes(b"not a sentencepiece model")
    (data / SP_FILES[1]).unlink()
    (data / SP_FILES[1]).touch()  # other files: complete when non-empty
    fake.calls.clear()
    rc, out, err = run(capsys, data, fake, "3")
    assert rc == 0, err
    assert fake.paths() == ["datasets/manifest.json"] + [f"datasets/{SP_FILES[k]}" for k in (0, 1, 4)]
    assert f"incomplete {SP_FILES[4]}, downloading it again" in out
    assert shard.read_bytes() == content and model.read_bytes() == SP1024.read_bytes()


def test_too_many_train_shards_is_refused_before_any_shard_is_fetched(tmp_path, capsys, hub):
    fake, _ = hub
    data = tmp_path / "data"
    rc, out, err = run(capsys, data, fake, "--train-shards", "4")
    assert rc == 2
    assert err.count("\n") == 1 and "fineweb10B_sp1024 has only 3 training shards" in err
    assert fake.paths() == ["datasets/manifest.json"]
    assert not list(data.rglob("*.bin")) and not (data / "tokenizers").exists()


def test_positional_shard_count(tmp_path, capsys, hub):
    fake, _ = hub
    data = tmp_path / "data"
    assert run(capsys, data, fake, "1")[0] == 0
    assert sorted(p.name for p in data.rglob("*.bin")) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    with pytest.raises(SystemExit) as e:  # both forms at once is ambiguous
        ccf.main(["1", "--train-shards", "2"], fetch=fake, data_dir=data)
    assert e.value.code == 2


def test_unknown_variant_lists_the_available_ones(tmp_path, capsys, hub):
    rc, out, err = run(capsys, tmp_path / "data", hub[0], "--variant", "sp4096", "1")
    assert rc == 2
    assert err == ("cached_challenge_fineweb.py: error: variant 'sp4096' (fineweb10B_sp4096) is not in "
                   f"{tmp_path / 'data/manifest.json'}; available: byte260, sp1024\n")
    assert hub[0].calls == [("kevclark/parameter-golf", "datasets/manifest.json")]  # sp4096's own repo


def test_byte_variant_with_a_bare_tokenizer_file_name(tmp_path, capsys, hub):
    data = tmp_path / "data"
    rc, out, err = run(capsys, data, hub[0], "--variant", "byte260", "1")
    assert rc == 0, err
    assert local_files(data) == ["datasets/fineweb10B_byte260/fineweb_train_000000.bin",
                                 "datasets/fineweb10B_byte260/fineweb_val_000000.bin",
                                 "manifest.json", "tokenizers/fineweb_pure_byte_260.json"]


def test_skip_manifest(tmp_path, capsys, hub):
    fake, _ = hub
    data = tmp_path / "data"
    rc, out, err = run(capsys, data, fake, "--skip-manifest", "1")
    assert rc == 2 and fake.calls == []
    assert err.count("\n") == 1 and "--skip-manifest needs a local" in err and "manifest.json" in err
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps(manifest_dict()))
    rc, out, err = run(capsys, data, fake, "--skip-manifest", "1")
    assert rc == 0, err
    assert "datasets/manifest.json" not in fake.paths() and len(fake.calls) == 4


def test_with_docs(tmp_path, capsys, hub):
    fake, base = hub
    data = tmp_path / "data"
    assert run(capsys, data, fake, "0", "--with-docs")[0] == 0
    assert fake.paths()[-2:] == ["datasets/docs_selected.jsonl", "datasets/docs_selected.source_manifest.json"]
    for name in ccf.DOCS:
        assert (data / name).read_bytes() == (base / name).read_bytes()


def _drop(path):
    def edit(m):
        *keys, last = path
        for k in keys:
            m = m[k]
        del m[last]
    return edit


@pytest.mark.parametrize("edit, message", [
    (_drop(["datasets", 0, "stats", "files_train"]), "field datasets[0].stats.files_train is missing"),
    (_drop(["datasets", 0, "tokenizer_name"]), "field datasets[0].tokenizer_name is missing"),
    (_drop(["tokenizers"]), "field tokenizers is missing"),
    (lambda m: m["datasets"][0]["stats"].update(files_val="1"), "files_val is missing or not a non-negative integer"),
    (lambda m: m["tokenizers"][0].update(model_path="../../etc/x.model"), "leads outside the data directory"),
    (lambda m: m["tokenizers"].pop(0), "tokenizer 'sp_bpe_1024' is not among"),
])
def test_a_bad_manifest_is_one_error_naming_field_and_file(tmp_path, capsys, edit, message):
    manifest = manifest_dict()
    edit(manifest)
    fake, _ = make_remote(tmp_path, manifest=manifest)
    rc, out, err = run(capsys, tmp_path / "data", fake, "1")
    assert rc == 2 and err.count("\n") == 1
    assert str(tmp_path / "data" / "manifest.json") in err and message in err
    assert fake.paths() == ["datasets/manifest.json"]


def test_a_manifest_that_is_not_json(tmp_path, capsys):
    fake, base = make_remote(tmp_path)
    (base / "manifest.json").write_text("<html>rate limited</html>")
    rc, out, err = run(capsys, tmp_path / "data", fake, "1")
    assert rc == 2 and err.count("\n") == 1 and "not a readable JSON manifest" in err


def test_a_connection_error_is_one_line_and_exit_1(tmp_path, capsys):
    def offline(repo_id, remote_path):
        raise ConnectionError("[Errno 101] Network is unreachable")

    rc, out, err = run(capsys, tmp_path / "data", offline, "1")
    assert rc == 1
    assert err == ("cached_challenge_fineweb.py: error: cannot download datasets/manifest.json from "
                   f"{REPO}: ConnectionError: [Errno 101] Network is unreachable\n")
    assert not (tmp_path / "data").exists()


def test_a_failure_midway_keeps_the_finished_files(tmp_path, capsys, hub):
    fake, base = hub
    (base / SP_FILES[3]).unlink()  # the hub now lacks the first training shard
    data = tmp_path / "data"
    rc, out, err = run(capsys, data, fake, "2")
    assert rc == 1 and err.count("\n") == 1 and f"cannot download datasets/{SP_FILES[3]}" in err
    assert local_files(data) == sorted(["manifest.json"] + SP_FILES[:3])


def test_a_partial_copy_never_appears_under_the_final_name(tmp_path, capsys, hub, monkeypatch):
    data = tmp_path / "data"
    during_copy = []

    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    def half_copy(src, dst):  # as if the disk filled up, or the process were killed, mid-copy
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read(100))
        during_copy.append(local_files(data))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(shutil, "copyfile", half_copy)
    rc, out, err = run(capsys, data, hub[0], "1")
    assert rc == 1 and err.count("\n") == 1 and "No space left on device" in err
    assert len(during_copy) == 1 and "manifest.json" not in during_copy[0]  # only a temporary name existed
    assert local_files(data) == []  # and it was removed


def test_copy_fallback_when_hard_links_fail(tmp_path, capsys, hub, monkeypatch):
    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    fake, base = hub
    data = tmp_path / "data"
    assert run(capsys, data, fake, "1")[0] == 0
    shard = data / SP_FILES[3]
    assert shard.read_bytes() == (base / SP_FILES[3]).read_bytes() and not os.path.samefile(shard, base / SP_FILES[3])


def test_hf_fetch_asks_the_dataset_repo_for_file_and_subfolder(monkeypatch):
    calls = []
    monkeypatch.setattr(ccf, "hf_hub_download", lambda **kw: calls.append(kw) or "/cache/x")
    assert ccf.hf_fetch("a/b", "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin") == "/cache/x"
    ccf.hf_fetch("a/b", "manifest.json")
    assert calls == [
        dict(repo_id="a/b", filename="fineweb_val_000000.bin", subfolder="datasets/datasets/fineweb10B_sp1024",
             repo_type="dataset"),
        dict(repo_id="a/b", filename="manifest.json", subfolder=None, repo_type="dataset"),
    ]


def test_the_real_hub_client_offline_is_one_error_line(tmp_path, monkeypatch):
    # huggingface_hub reads its environment at import, hence a fresh process. HF_ENDPOINT points at a closed
    # local port, so that even if offline mode were ignored nothing would leave the machine.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    data = tmp_path / "data"
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'data')!r}); import cached_challenge_fineweb as c; "
            f"sys.exit(c.main(['1'], data_dir={str(data)!r}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stdout == ""
    assert len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.startswith("cached_challenge_fineweb.py: error: cannot download datasets/manifest.json from "
                               f"{REPO}: ")
    assert "offline mode is enabled" in p.stderr
    assert not data.exists()


CASEOPS_NAME = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"


def caseops_remote(tmp_path, sidecar=True):
    """The layout of the CaseOps dataset repo (PR #1729): one dataset whose validation shards have byte
    sidecars (val_bytes_glob), and its tokenizer."""
    from conftest import CASEOPS

    base = tmp_path / "remote" / "datasets"
    ds = base / "datasets" / CASEOPS_NAME
    ds.mkdir(parents=True)
    write_shard(ds / "fineweb_val_000000.bin", np.arange(300) % 8192)
    write_shard(ds / "fineweb_val_bytes_000000.bin", np.arange(300) % 7)
    for k in range(2):
        write_shard(ds / f"fineweb_train_{k:06d}.bin", np.full(100, k))
    (base / "tokenizers").mkdir()
    shutil.copy(CASEOPS, base / "tokenizers" / CASEOPS.name)
    entry = {"name": CASEOPS_NAME, "tokenizer_name": "caseops_v1",
             "stats": {"files_train": 2, "files_val": 1, "docs_val": 50000}}
    if sidecar:
        entry["val_bytes_glob"] = "fineweb_val_bytes_*.bin"
    manifest = {"datasets": [entry],
                "tokenizers": [{"name": "caseops_v1", "model_path": f"tokenizers/{CASEOPS.name}"}]}
    (base / "manifest.json").write_text(json.dumps(manifest))
    return FakeHub(tmp_path / "remote", tmp_path / "hf_cache"), base


def test_caseops_variant_fetches_the_byte_sidecar_from_its_repo(tmp_path, capsys):
    fake, base = caseops_remote(tmp_path)
    data = tmp_path / "data"
    rc, out, err = run(capsys, data, fake, "--variant", "caseops", "2")
    assert rc == 0, err
    files = ["tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
             f"datasets/{CASEOPS_NAME}/fineweb_val_000000.bin", f"datasets/{CASEOPS_NAME}/fineweb_val_bytes_000000.bin",
             f"datasets/{CASEOPS_NAME}/fineweb_train_000000.bin", f"datasets/{CASEOPS_NAME}/fineweb_train_000001.bin"]
    assert fake.calls == [("romeerp/parameter-golf-caseops-v1", f"datasets/{rel}") for rel in ["manifest.json"] + files]
    assert all((data / rel).read_bytes() == (base / rel).read_bytes() for rel in files)
    assert out.splitlines()[-1].startswith("caseops (romeerp/parameter-golf-caseops-v1): 5 files")


def test_caseops_dataset_without_a_sidecar_is_refused(tmp_path, capsys):
    fake, _ = caseops_remote(tmp_path, sidecar=False)
    rc, out, err = run(capsys, tmp_path / "data", fake, "--variant", "caseops", "1")
    assert rc == 2 and "lists no validation byte sidecar (val_bytes_glob)" in err
    assert fake.paths() == ["datasets/manifest.json"]


@pytest.mark.parametrize("variant, repo", [("sp8192", "kevclark/parameter-golf"), ("sp1024", REPO),
                                           ("byte260", REPO)])
def test_each_variant_has_its_repo_and_the_environment_overrides_it(tmp_path, capsys, monkeypatch, variant, repo):
    def offline(repo_id, remote_path):
        raise ConnectionError(f"{repo_id}")

    rc, out, err = run(capsys, tmp_path / "data", offline, "--variant", variant, "1")
    assert rc == 1 and f"from {repo}: ConnectionError" in err
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "me/mirror")
    rc, out, err = run(capsys, tmp_path / "data", offline, "--variant", variant, "1")
    assert rc == 1 and "from me/mirror: ConnectionError" in err
