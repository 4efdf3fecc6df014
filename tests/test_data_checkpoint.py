"""Corpora, token caching, batches, checkpoints."""

import errno
import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt import checkpoint as checkpoint_module
from minigpt.train import data
from minigpt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minigpt.train.data import BatchSampler, DataError, load_corpus
from minigpt.runtime import os_error_message

ROOT = Path(__file__).resolve().parent.parent


def test_local_file_tokenized_and_cached(text_file, monkeypatch):
    c1 = load_corpus(str(text_file), "char")
    text = text_file.read_text()
    assert len(c1.train) + len(c1.val) == len(text)
    assert len(c1.train) == int(len(text) * 0.9)
    assert c1.tokenizer.decode(np.asarray(c1.val[:50]).tolist()) == text[len(c1.train):][:50]
    # The second load reads the memmaps: tokenizing again would fail here.
    monkeypatch.setattr(data.CharTokenizer, "encode", lambda *a: pytest.fail("re-tokenized"))
    c2 = load_corpus(str(text_file), "char")
    assert np.array_equal(c1.train, c2.train) and c2.train.dtype == np.uint16


@pytest.mark.parametrize("make, pattern", [
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(b"abc\xff\xfedef"), r"not UTF-8.*0xff at offset 3"),
    (lambda p: p.mkdir(), "directory"),
    (lambda p: None, "no such file"),
])
def test_bad_corpus_files(tmp_path, make, pattern):
    path = tmp_path / "bad.txt"
    make(path)
    with pytest.raises(DataError, match=pattern):
        load_corpus(str(path), "char")


def test_vocabulary_too_large_for_uint16_is_stored_as_uint32(tmp_path):
    path = tmp_path / "wide.txt"
    text = "".join(chr(c) for c in range(0x100, 0x100 + 70000)
                   if not 0xD800 <= c <= 0xDFFF)  # 67952 chars: ids beyond uint16
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(str(path), "char")
    assert corpus.train.dtype == np.uint32 and corpus.tokenizer.vocab_size > 65536
    assert corpus.tokenizer.decode(corpus.train.tolist() + corpus.val.tolist()) == text


def test_offline_without_cache_explains(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as info:
        data.download_shakespeare()
    msg = str(info.value)
    assert data.SHAKESPEARE_URL in msg and "--data" in msg and "--import-file" in msg


class _Response:
    """What urllib.request.urlopen returns, reduced to what download_shakespeare uses."""

    def __init__(self, payload: bytes):
        self.payload = payload

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self):
        return self.payload


def test_download_checks_sha256(monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _Response(b"not shakespeare"))
    with pytest.raises(DataError, match="sha256"):
        data.download_shakespeare()
    assert not data.shakespeare_path().exists()


def test_download_caches_verified_copy(monkeypatch):
    payload = b"To be, or not to be\n" * 100
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())

    calls = []
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda *a, **k: calls.append(1) or _Response(payload))
    p1 = data.download_shakespeare()
    p2 = data.download_shakespeare()
    assert p1 == p2 and p1.read_bytes() == payload and len(calls) == 1


def test_import_file_checks_hash(tmp_path):
    fake = tmp_path / "fake.txt"
    fake.write_text("hello")
    with pytest.raises(DataError, match="not tiny Shakespeare"):
        data.import_shakespeare(fake)


def test_data_command_line_imports_and_downloads(tmp_path, monkeypatch, capsys):
    """python -m minigpt data: --import-file PATH and the download, exit codes 0 and 2."""
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())
    copy = tmp_path / "copy.txt"
    copy.write_bytes(payload)
    assert data.main(["--import-file", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == str(data.shakespeare_path())
    assert data.shakespeare_path().read_bytes() == payload

    wrong = tmp_path / "wrong.txt"
    wrong.write_bytes(payload + b"!")
    assert data.main(["--import-file", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(wrong) in err and "sha256" in err
    assert data.main(["--import-file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err

    data.shakespeare_path().unlink()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _Response(payload))
    assert data.main([]) == 0 and data.shakespeare_path().read_bytes() == payload
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _Response(b"other"))
    data.shakespeare_path().unlink()
    assert data.main([]) == 2 and "sha256" in capsys.readouterr().err


def test_data_module_runs_as_a_script(tmp_path):
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not the corpus")
    r = subprocess.run([sys.executable, "-m", "minigpt.train.data", "--import-file", str(wrong)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MINIGPT_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 2 and "not tiny Shakespeare" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "cache" / "data" / "tinyshakespeare.txt").exists()


def test_batch_sampler_shapes_and_shift():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = BatchSampler(tokens, 16, 4, seed=0).next()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))


def test_batch_sampler_ranks_partition_the_global_batch():
    tokens = np.arange(5000, dtype=np.uint16)
    (xg, _), = [BatchSampler(tokens, 8, 6, seed=3).next()]
    parts = [BatchSampler(tokens, 8, 3, seed=3, rank=r, world_size=2).next()[0] for r in (0, 1)]
    assert torch.equal(torch.cat(parts), xg)


def test_batch_sampler_too_short():
    with pytest.raises(DataError, match="block_size"):
        BatchSampler(np.arange(10, dtype=np.uint16), 10, 2, seed=0)


def _state():
    return {"model": {"w": torch.randn(3, 3)}, "model_config": {"n_layer": 1},
            "tokenizer": {"kind": "char", "chars": "ab"}, "iter_num": 5}


def test_checkpoint_round_trip(tmp_path):
    state = _state()
    save_checkpoint(state, tmp_path / "ckpt.pt")
    back = load_checkpoint(tmp_path / "ckpt.pt")
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["iter_num"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp files left


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(_state(), path)
    before = path.read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({**_state(), "iter_num": 99}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.mark.parametrize("corrupt", ["truncate", "garbage", "foreign", "pickle"])
def test_bad_checkpoints_give_one_line_errors(tmp_path, corrupt):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(_state(), path)
    raw = path.read_bytes()
    if corrupt == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif corrupt == "garbage":
        path.write_bytes(os.urandom(len(raw)))
    elif corrupt == "foreign":
        torch.save({"something": torch.ones(2)}, path)
    else:
        torch.save({"model": os.system, "model_config": {}, "tokenizer": {}}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncate_even", "truncate_odd", "empty", "random"])
def test_a_damaged_token_cache_is_rebuilt_with_a_line_saying_so(text_file, tmp_path, monkeypatch,
                                                                damage):
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    first = load_corpus(str(text_file), "char")
    train = np.array(first.train)
    key_dir = next((data.cache_dir() / "tokens").glob("*-char"))
    meta = json.loads((key_dir / "meta.json").read_text())
    assert meta["files"]["train.bin"]["bytes"] == train.nbytes  # recorded at build time
    raw = (key_dir / "train.bin").read_bytes()
    damaged = {"truncate_even": raw[: len(raw) // 2 // 2 * 2], "truncate_odd": raw[:-1],
               "empty": b"", "random": np.random.default_rng(0).bytes(len(raw))}[damage]
    (key_dir / "train.bin").write_bytes(damaged)
    lines = []
    again = load_corpus(str(text_file), "char", log=lines.append)
    assert np.array_equal(np.array(again.train), train)  # every token, as before
    assert len(lines) == 1 and "rebuilding" in lines[0] and str(key_dir) in lines[0], lines
    lines.clear()
    load_corpus(str(text_file), "char", log=lines.append)
    assert lines == []  # whole again: no second rebuild


def test_a_fifo_corpus_is_refused_not_read(tmp_path):
    fifo = tmp_path / "corpus.fifo"
    os.mkfifo(fifo)
    # In a subprocess: before the check, reading the FIFO blocked for ever.
    code = ("import sys\nfrom minigpt.train.data import load_corpus, DataError\n"
            "try:\n    load_corpus(sys.argv[1], 'char')\n"
            "except DataError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert "FIFO" in r.stdout and str(fifo) in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "minigpt.train.data", "--import-file", str(fifo)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "FIFO" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_cache_dir_that_is_a_file_is_named(text_file, tmp_path, monkeypatch):
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cachefile"))
    with pytest.raises(DataError, match="MINIGPT_CACHE_DIR .*cachefile: exists and is not a "
                                        "directory"):
        load_corpus(str(text_file), "char")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_checkpoint(_state(), tmp_path / "ckpt.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt.pt").stat().st_mode & 0o777 == mode
    (tmp_path / "ckpt.pt").chmod(0o640)  # a replaced file keeps its own mode
    save_checkpoint(_state(), tmp_path / "ckpt.pt")
    assert (tmp_path / "ckpt.pt").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_a_refused_write_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                          err):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(_state(), path)
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, fh, *a, **kw):
        # torch's zip writer turns a failing write into a RuntimeError ("unexpected pos"),
        # raised while handling the OSError.
        fh.write(b"x" * 100)
        try:
            raise OSError(err, os.strerror(err))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(OSError) as info:
        save_checkpoint({**_state(), "iter_num": 99}, path)
    assert info.value.errno == err and info.value.filename == str(path)
    assert os_error_message(info.value) == (f"{path}: {os.strerror(err)} "
                                            f"({errno.errorcode[err]})")
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
