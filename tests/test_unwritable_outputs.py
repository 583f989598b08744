"""Outputs that cannot be written (read-only, full, size-limited): refused when the flags are read, before
any work; a write that fails during the run is one line naming the flag and the reason, exit status 2; an
index pair and its results line are written together or not at all."""
from __future__ import annotations

import errno
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import active_sampler
import eval_knn
import eval_lincls
import sampler
from lowbudget import fileio
from tests.helpers import REPO, call_main, unit_rows

OUTPUTS = [(sampler, "--indices"), (sampler, "--save"), (sampler, "--results"), (eval_lincls, "--save")]
REASONS = {errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device"}


@pytest.fixture
def feats(tmp_path):
    """Train and evaluation features of three classes, and a random pool of 10 for the evaluators."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", feats=unit_rows(60, 8), labels=rng.integers(0, 3, 60))
    np.savez(tmp_path / "val.npz", feats=unit_rows(30, 8, seed=1), labels=rng.integers(0, 3, 30))
    return tmp_path


def arguments(script, tmp_path, **outputs) -> list:
    """A quick run of `script` on the fixture's features, its outputs under tmp_path unless given."""
    where = {"--indices": tmp_path / "idx", "--save": tmp_path / "out", **outputs}
    flags = [part for flag, path in where.items() for part in (flag, path)]
    common = ["--dataset", "cifar10", "--feats", tmp_path / "train.npz", *flags]
    if script is sampler:
        return [*common, "--name", "kmeans", "--splits", "5"]
    if script is active_sampler:
        return [*common, "--val-feats", tmp_path / "val.npz", "--cached", "--name", "entropy", "--splits", "5",
                "--init-random", "10", "--epochs", "1"]
    return [*common, "--val-feats", tmp_path / "val.npz", "--cached", "--name", "random", "--splits", "10",
            "--epochs", "2"]


def error_line(err: str) -> str:
    """The one line of an error, without the program's name (in this process, pytest's)."""
    assert len(err.strip().splitlines()) == 1, err
    return err.strip().split(": error: ", 1)[1]


def refuse_writes_in(monkeypatch, folder, code: int) -> None:
    """Make `folder` refuse what the flag check tries there, as a file system does: creating a file (EROFS),
    or writing its first byte (ENOSPC)."""
    real_mkstemp, real_write, opened = tempfile.mkstemp, os.write, set()

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir) == str(folder) and code == errno.EROFS:
            raise OSError(code, os.strerror(code), os.path.join(dir, "tmpfile"))
        fd, path = real_mkstemp(*args, dir=dir, **kwargs)
        if os.path.dirname(path) == str(folder):
            opened.add(fd)
        return fd, path

    def write(fd, data):
        if fd in opened:
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("code", sorted(REASONS))
@pytest.mark.parametrize(("script", "flag"), OUTPUTS, ids=[f"{s.__name__}{f}" for s, f in OUTPUTS])
def test_an_output_location_that_refuses_writes_is_refused_when_the_flags_are_read(
        feats, capsys, monkeypatch, script, flag, code):
    folder = feats / "unwritable"
    folder.mkdir()
    location = folder / ("results.jsonl" if flag == "--results" else "new")
    refuse_writes_in(monkeypatch, folder, code)
    status, out, err = call_main(script.main, arguments(script, feats, **{flag: location}), capsys)
    assert status == 2
    assert error_line(err) == f"argument {flag}: cannot write in {str(folder)!r}: {REASONS[code]}"
    assert out == ""  # before any work


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs")
def test_a_location_where_no_file_can_be_made_is_refused_when_the_flags_are_read(feats, capsys):
    status, out, err = call_main(sampler.main, arguments(sampler, feats, **{"--save": "/sys/kernel/output"}), capsys)
    assert status == 2 and out == ""
    assert error_line(err) == "argument --save: cannot write in '/sys/kernel': permission denied"


def test_only_the_scripts_that_write_index_files_probe_indices(feats, capsys, monkeypatch):
    """The evaluators read index files from --indices: a read-only --indices is theirs to read."""
    assert call_main(sampler.main, [*arguments(sampler, feats), "--name", "random", "--splits", "10"], capsys)[0] == 0
    refuse_writes_in(monkeypatch, feats / "idx", errno.EROFS)
    status, _, err = call_main(sampler.main, arguments(sampler, feats), capsys)
    assert status == 2 and "argument --indices: cannot write in" in err
    status, out, err = call_main(eval_knn.main, ["--dataset", "cifar10", "--feats", feats / "train.npz", "--val-feats",
                                                 feats / "val.npz", "--indices", feats / "idx", "--save", feats / "out",
                                                 "--name", "random", "--splits", "10"], capsys)
    assert status == 0, err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_results_file_is_one_line_and_leaves_no_index_files(feats, capsys):
    status, out, err = call_main(sampler.main, arguments(sampler, feats, **{"--results": "/dev/full"}), capsys)
    assert status == 2
    assert error_line(err) == "--results: cannot write '/dev/full': no space left on the device"
    assert not (feats / "idx").exists() or not list((feats / "idx").iterdir())  # the pair goes with its line


def run_limited(limit: int, script: str, *args) -> subprocess.CompletedProcess:
    """`python script args` with every file it writes limited to `limit` bytes (RLIMIT_FSIZE)."""
    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600, preexec_fn=limit_file_size)


@pytest.mark.slow  # a new process
def test_a_results_line_cut_off_by_the_file_size_limit_is_taken_back_with_its_index_files(feats):
    """The line would end past the limit: the part written is cut off again, and the pair is not written."""
    results = feats / "results.jsonl"
    before = b'{"metric": "earlier"}\n' * 180  # 3960 bytes: the next line crosses 4096
    results.write_bytes(before)
    done = run_limited(4096, "sampler.py", *arguments(sampler, feats, **{"--results": results}))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"sampler.py: error: --results: cannot write {str(results)!r}: "
                                                    "file too large (the file size limit)")
    assert results.read_bytes() == before
    assert not (feats / "idx").exists() or not list((feats / "idx").iterdir())


@pytest.mark.slow  # a new process
def test_index_files_past_the_file_size_limit_take_their_results_line_back(feats):
    """The line fits, the index file (1000 entries, 8 KB) does not: neither is left."""
    rng = np.random.default_rng(0)
    np.savez(feats / "train.npz", feats=unit_rows(2000, 8), labels=rng.integers(0, 3, 2000))
    results = feats / "results.jsonl"
    done = run_limited(4096, "sampler.py", *arguments(sampler, feats, **{"--results": results})[:-4],
                       "--name", "random", "--splits", "1000")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"sampler.py: error: --indices: cannot write {str(feats / 'idx' / 'random_cifar10_1000.npy')!r}: "
        "file too large (the file size limit)")
    assert results.read_bytes() == b""
    assert not list((feats / "idx").iterdir())


@pytest.mark.slow  # a new process
def test_a_checkpoint_past_the_file_size_limit_names_save(feats, capsys):
    """eval_lincls.py saves the head's checkpoint under --save (torch.save, whose own error says nothing of
    the file system)."""
    assert call_main(sampler.main, [*arguments(sampler, feats)[:-4], "--name", "random", "--splits", "10"],
                     capsys)[0] == 0
    done = run_limited(1000, "eval_lincls.py", *arguments(eval_lincls, feats))
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"eval_lincls.py: error: --save: cannot write {str(feats / 'out')!r}"[:-1] + "/")
    assert last.endswith(".pth': file too large (the file size limit)")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("script", [sampler, active_sampler])
def test_a_disk_that_fills_while_the_index_files_are_written_takes_their_results_line_back(
        feats, capsys, monkeypatch, script):
    """The flag check passed; the disk is full by the time the pair is written. Lines about other things
    (active_sampler's accuracy of the round) stay."""
    real = fileio._write_temporary

    def full_disk(path, write):
        if path.endswith("_5.npy") or path.endswith("_15.npy"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write)

    monkeypatch.setattr(fileio, "_write_temporary", full_disk)
    results = feats / "out" / "results.jsonl"
    status, _, err = call_main(script.main, arguments(script, feats), capsys)
    assert status == 2
    written = "kmeans_cifar10_5.npy" if script is sampler else "entropy_cifar10_15.npy"
    assert error_line(err) == f"--indices: cannot write {str(feats / 'idx' / written)!r}: no space left on the device"
    lines = results.read_text().splitlines() if results.exists() else []
    assert not any('"coverage"' in line for line in lines if '"split": 15' in line or '"split": 5' in line)
    assert not (feats / "idx" / written).exists()
    if script is active_sampler:
        assert any('"active_top1"' in line for line in lines)


@pytest.mark.slow  # a new process
def test_the_file_system_refusing_a_write_on_a_real_mount(feats, tmp_path):
    """A read-only and a full tmpfs, where this machine lets a new mount namespace have them (root)."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs in a new mount namespace here")
    mount = tmp_path / "mnt"
    mount.mkdir()
    run = shlex.join([sys.executable, str(REPO / "sampler.py"),
                      *map(str, arguments(sampler, feats, **{"--indices": mount / "idx"}))])
    script = (f"mount -t tmpfs -o ro,size=64k tmpfs {mount} && {run}; umount {mount}; "
              f"mount -t tmpfs -o size=8k tmpfs {mount} && head -c 8192 /dev/zero > {mount}/fill; {run}")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.stderr.count(f"sampler.py: error: argument --indices: cannot write in {str(mount)!r}: ") == 2
    assert "read-only file system" in done.stderr and "no space left on the device" in done.stderr
