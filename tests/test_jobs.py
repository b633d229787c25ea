"""The shared job pool and subprocess runner (issue 17 items 2, 3, 4, 10): a dead worker fails only its job,
no process outlives the command (kill -9 of the main process, TotalSegmentator timeouts, grandchildren), a
pool that cannot start still reports every volume."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fvlm.data import jobs, store
from fvlm.data.jobs import JobError, process_alive, run_command, run_jobs

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}


def _double_or_die(i: int, die: bool) -> int:
    if die:
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
    if i == 5:
        raise ValueError("bad input 5")
    time.sleep(0.02)
    return 2 * i


@pytest.mark.parametrize("context", ["forkserver", "spawn"])
def test_dead_worker_fails_only_its_job(context):
    got = dict(run_jobs(_double_or_die, [(i, i in (2, 7)) for i in range(10)], 2, context=context))
    assert sorted(got) == list(range(10))
    for i in range(10):
        if i in (2, 7):
            assert isinstance(got[i], JobError) and got[i].worker_died
            assert "killed by SIGKILL" in got[i].error and "out-of-memory" in got[i].error
        elif i == 5:
            assert isinstance(got[i], JobError) and not got[i].worker_died and "bad input 5" in got[i].error
        else:
            assert got[i] == 2 * i


def test_no_worker_can_start_fails_every_job_with_the_reason(monkeypatch):
    def refuse(*a, **k):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(jobs, "_Worker", refuse)
    got = dict(run_jobs(_double_or_die, [(i, False) for i in range(4)], 2))
    assert sorted(got) == [0, 1, 2, 3]
    assert all(isinstance(r, JobError) and "could not start a worker process" in r.error
               and "Cannot allocate memory" in r.error for r in got.values())


def test_a_script_without_main_guard_is_told_how_to_fix_it(tmp_path):
    """Worker processes import the calling script: one that calls fvlm at its top level (no __main__ guard) makes
    every worker try to start workers of its own; the error says what to change."""
    script = tmp_path / "unguarded.py"
    script.write_text("import math\nfrom fvlm.data.jobs import run_jobs\n"
                      "print(sorted(dict(run_jobs(math.sqrt, [(4.0,), (9.0,)], 2)).values()))\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "could not start a worker process" in p.stderr
    assert 'under `if __name__ == "__main__":`' in p.stderr and "out of memory" not in p.stderr


# ------------------------------------------------------------------------------------------- process trees
def _procs() -> dict[int, tuple[int, str]]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            rest = st[st.rindex(")") + 2:].split()
            out[int(d)] = (int(rest[1]), rest[0])
    return out


def descendants(pid: int) -> set[int]:
    t = _procs()
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = [q for q, (pp, state) in t.items() if pp == p and state != "Z"]
        found.update(kids)
        todo += kids
    return found


def _wait_dead(pids: set[int], timeout: float = 10.0) -> set[int]:
    end = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < end:
        alive = {p for p in alive if process_alive(p)}
        time.sleep(0.1)
    for p in alive:  # do not leave them behind even when the test fails
        os.kill(p, signal.SIGKILL)
    return alive


@pytest.fixture(scope="module")
def source(tiny_data) -> Path:
    """The synthetic CT-RATE root behind the session's tiny store (6 train + 3 valid patients)."""
    return tiny_data.parent / "data"


def _preprocess(source: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fvlm", "preprocess", "--data", str(source), "--split", "train",
                             "--out", str(out), "--config", "tiny", "--workers", "2", *extra], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _workers(pid: int) -> set[int]:
    """The pool workers of a preprocess run: children of its forkserver."""
    out = set()
    for q in descendants(pid):
        try:
            if b"forkserver" in Path(f"/proc/{q}/cmdline").read_bytes():
                out |= descendants(q)
        except OSError:
            pass
    return out


def _n_done(out: Path) -> int:
    d = out / "train"
    return sum(1 for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else 0


def _wait(cond, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_killed_preprocess_worker_fails_one_volume(source, tmp_path):
    out = tmp_path / "out"
    p = _preprocess(source, out)
    _wait(lambda: len(_workers(p.pid)) == 2 or p.poll() is not None)
    os.kill(min(_workers(p.pid)), signal.SIGKILL)  # a worker holds a volume from its start
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1, err[-2000:]
    with open(out / "failures.csv", newline="") as f:
        failed = list(csv.DictReader(f))
    m = store.read_manifest(out)
    assert len(failed) == 1, failed  # before the fix: every volume not yet done (all but 1-2 of them)
    assert "worker process died (killed by SIGKILL" in failed[0]["error"]
    assert (m["status"] == "ok").sum() == len(m) - 1
    assert not list((out / "train").glob(".*"))  # the dead worker's temporary directory is gone
    # a rerun redoes exactly the failed volume
    assert subprocess.run([sys.executable, "-m", "fvlm", "preprocess", "--data", str(source), "--split", "train",
                           "--out", str(out), "--config", "tiny"], env=ENV, capture_output=True).returncode == 0


def test_kill_9_of_preprocess_main_leaves_no_process(source, tmp_path):
    out = tmp_path / "out"
    p = _preprocess(source, out)
    _wait(lambda: len(_workers(p.pid)) == 2 or p.poll() is not None)
    kids = descendants(p.pid)
    assert len(kids) >= 3  # forkserver + 2 workers (+ resource tracker)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert _wait_dead(kids) == set()  # before the fix: forkserver and workers stayed (about 800 MB)


def test_forkserver_that_cannot_start_still_reports(source, tmp_path):
    """With an address-space limit the main process lives with but torch (preloaded by the forkserver) does not,
    the run ends with failures.csv listing every volume, exit 1 and no traceback."""
    import resource

    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (600 * 2**20, 600 * 2**20))

    r = subprocess.run([sys.executable, "-m", "fvlm", "preprocess", "--data", str(source), "--split", "valid",
                        "--out", str(out), "--config", "tiny", "--workers", "2", "--limit", "3"], env=ENV,
                       preexec_fn=limit, capture_output=True, text=True, timeout=120)
    # the main process ends with its summary line, not a traceback (the forkserver may print its own MemoryError)
    assert "fvlm.data.preprocess: preprocess:" in r.stderr.strip().splitlines()[-1], r.stderr[-3000:]
    m = store.read_manifest(out)
    assert len(m) == 3
    if r.returncode == 1:  # the usual case: the forkserver could not import torch
        with open(out / "failures.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 3 and all("worker process" in x["error"] for x in rows)
    else:  # a machine where 600 MB suffice: every volume done
        assert r.returncode == 0 and set(m["status"]) == {"ok"}


# ------------------------------------------------------------------------------------------- subprocesses
# a stand-in TotalSegmentator that starts a grandchild (as nnU-Net's worker processes) and hangs
HANGING = """#!{python}
import os, subprocess, sys, time
args = sys.argv[1:]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
with open(os.environ["STANDIN_PIDS"], "a") as f:
    f.write(f"{{os.getpid()}} {{child.pid}}\\n")
time.sleep(300)
"""


@pytest.fixture()
def hanging(tmp_path, monkeypatch) -> tuple[Path, Path]:
    exe = tmp_path / "bin" / "TotalSegmentator"
    exe.parent.mkdir()
    exe.write_text(HANGING.format(python=sys.executable))
    exe.chmod(0o755)
    pids = tmp_path / "pids.txt"
    monkeypatch.setenv("STANDIN_PIDS", str(pids))
    return exe, pids


def _standin_pids(path: Path) -> set[int]:
    return {int(x) for line in path.read_text().splitlines() for x in line.split()} if path.exists() else set()


def test_timeout_kills_the_command_and_its_grandchildren(hanging):
    exe, pids = hanging
    t0 = time.monotonic()
    r = run_command([str(exe)], timeout=3)
    assert r.timed_out and time.monotonic() - t0 < 30
    started = _standin_pids(pids)
    assert len(started) == 2
    assert _wait_dead(started, 3.0) == set()  # before the fix: the grandchild kept running


def test_kill_9_of_segment_kills_totalsegmentator_and_cleans_temporaries(hanging, tmp_path):
    from tests.test_segment import _phantom, _write  # the v1 phantom of the segment tests

    exe, pids = hanging
    img = tmp_path / "in" / "vol.nii.gz"
    _write(img, _phantom(), geometry=True)
    pairs = tmp_path / "in" / "pairs.csv"
    pairs.write_text(f"volume,image,label\nvol,{img},{tmp_path / 'maps' / 'vol.nii.gz'}\n")
    p = subprocess.Popen([sys.executable, "-m", "fvlm", "segment", "--pairs", str(pairs), "--totalseg-cmd", str(exe)],
                         env={**ENV, "STANDIN_PIDS": str(pids)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    _wait(lambda: len(_standin_pids(pids)) == 2 or p.poll() is not None, 60)
    tree = descendants(p.pid)
    assert _standin_pids(pids) <= tree
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert _wait_dead(tree) == set()  # supervisor, stand-in and its grandchild
    # the interrupted output's temporary file lies next to the output, never in the system temp folder
    assert [q.name.startswith(".vol.nii.gz.") for q in (tmp_path / "maps").iterdir()] == [True]
