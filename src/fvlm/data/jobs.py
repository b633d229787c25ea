"""A process pool for batch commands where one dead worker fails only the job it held.

``concurrent.futures.ProcessPoolExecutor`` marks the whole pool broken when one worker dies (the kernel's
OOM killer, a segfault in a native library): every pending job fails with ``BrokenProcessPool``. Here each
worker has its own pipe and holds one job at a time, so the parent always knows which job a dead worker
held: that job alone gets a :class:`JobError` ("worker process died ..."), a new worker is started and the
batch goes on.

Workers never outlive the command:

- on Linux every worker (and the forkserver it is forked from) asks the kernel for ``SIGKILL`` when its
  parent dies (``prctl(PR_SET_PDEATHSIG)``, through ctypes);
- a watchdog thread in every worker also exits the worker when the main process is gone (other systems,
  or a forkserver that outlives the main process);
- a worker whose pipe to the parent closes exits.

When no worker can be started at all (e.g. a low ``ulimit -v`` makes the forkserver fail), every job of
the run gets a :class:`JobError` saying so, and the caller writes its failures report as usual.

Also here, for every batch command: :func:`init_worker` (the worker initialiser: one thread per worker),
:class:`VolumeResult` / :class:`BatchSummary` (what a per-volume batch returns) and :func:`write_failures`
(the one failures report: a ``split,volume,error`` CSV), and :func:`run_command` (a subprocess killed with
its whole process group).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import io
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvlm.io import atomic_write_text

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
#: seconds between the watchdog's checks that the main process is alive
WATCHDOG_INTERVAL = 0.5


@dataclass
class JobError:
    """A job that did not return: its worker died, or the function raised (``error`` is one line)."""

    error: str
    worker_died: bool = False


# ----------------------------------------------------------------------------------------------- parent death
def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only); returns success."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return False


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except (OSError, ValueError, IndexError):
        return True


def start_watchdog(main_pid: int, interval: float = WATCHDOG_INTERVAL) -> threading.Thread:
    """A daemon thread that ends this process (``os._exit(1)``) as soon as ``main_pid`` is gone."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            if not process_alive(main_pid):
                os._exit(1)

    t = threading.Thread(target=watch, name="fvlm-watchdog", daemon=True)
    t.start()
    return t


def guard_process(main_pid: int) -> None:
    """Make this (worker) process die with ``main_pid``: parent-death signal plus a watchdog thread."""
    set_parent_death_signal()
    if not process_alive(main_pid):  # the main process died before the signal was armed
        os._exit(1)
    start_watchdog(main_pid)


# ----------------------------------------------------------------------------------------------- worker side
def _worker_main(conn: Any, fn: Callable[..., Any], initializer: Callable[[], None] | None, main_pid: int) -> None:
    guard_process(main_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the main process, which stops the pool
    if initializer is not None:
        initializer()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            os._exit(1)
        if msg is None:
            return
        index, args = msg
        try:
            result: Any = fn(*args)
        except Exception as e:  # the job's own error, reported for this job only
            log.debug("job %d raised", index, exc_info=True)
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            result = JobError(tb)
        try:
            conn.send((index, result))
        except Exception as e:  # an unpicklable result
            conn.send((index, JobError(f"result could not be sent back: {type(e).__name__}: {e}")))


# ----------------------------------------------------------------------------------------------- parent side
class _Worker:
    def __init__(self, ctx: Any, fn: Callable[..., Any], initializer: Callable[[], None] | None) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, fn, initializer, os.getpid()), daemon=True)
        try:
            self.proc.start()
        finally:
            child.close()
        self.job: int | None = None
        self.started = time.monotonic()

    def stop(self, timeout: float = 2.0) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(None)
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout)
        with contextlib.suppress(Exception):
            self.conn.close()


def describe_exit(exitcode: int | None) -> str:
    """``-9`` -> ``"killed by SIGKILL, e.g. by the kernel's out-of-memory killer"``, ``3`` -> ``"exit code 3"``."""
    if exitcode is None:
        return "no exit code"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        hint = ", e.g. by the kernel's out-of-memory killer" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {exitcode}"


def run_jobs(fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]] | Iterable[tuple[Any, ...]], workers: int, *,
             context: str = "forkserver", preload: Sequence[str] = (),
             initializer: Callable[[], None] | None = None, max_restarts: int | None = None,
             ) -> Iterator[tuple[int, Any]]:
    """Run ``fn(*args)`` for every ``args`` of ``jobs`` in ``workers`` processes; yield ``(index, result)`` in
    completion order, ``result`` being ``fn``'s return value or a :class:`JobError`.

    ``fn`` and ``initializer`` must be module-level functions (they are pickled). A worker that dies fails
    only its current job; it is replaced (at most ``max_restarts`` times, default: once per job). When
    workers cannot be started, the jobs not yet run get a :class:`JobError` naming the cause. Leaving the
    generator early (an exception, Ctrl-C) stops every worker.
    """
    jobs = list(jobs)
    n = len(jobs)
    if n == 0:
        return
    ctx = mp.get_context(context)
    if context == "forkserver":
        # the guard module is imported first: it makes the forkserver itself die with this process
        ctx.set_forkserver_preload(["fvlm.data._forkserver_guard", *preload])
    max_restarts = n if max_restarts is None else max_restarts
    pending = list(range(n))[::-1]  # pop() from the end: job order
    pool: list[_Worker] = []
    restarts = 0
    done = 0
    start_error: str | None = None

    def start() -> _Worker | None:
        nonlocal start_error
        try:
            return _Worker(ctx, fn, initializer)
        except Exception as e:  # cannot fork / exec / reach the forkserver (e.g. out of address space)
            if "bootstrapping phase" in str(e):  # a worker re-ran the caller's script: it has no __main__ guard
                why = ("a script that starts worker processes must call fvlm under `if __name__ == \"__main__\":` "
                       "(the workers import the script); --workers 1 runs without worker processes")
            else:
                why = "out of memory or address space, e.g. a low ulimit -v? --workers 1 runs without worker processes"
            start_error = f"could not start a worker process ({type(e).__name__}: {' '.join(str(e).split())}; {why})"
            log.error("%s", start_error)
            return None

    try:
        for _ in range(min(workers, n)):
            w = start()
            if w is None:
                break
            pool.append(w)
        while done < n:
            # a worker that died while idle held no job: replace it without failing any
            for w in [w for w in pool if w.job is None and pending and not w.proc.is_alive()]:
                pool.remove(w)
                log.warning("idle worker process %s died (%s); starting a new one", w.proc.pid,
                            describe_exit(w.proc.exitcode))
                if restarts < max_restarts:
                    restarts += 1
                    nw = start()
                    if nw is not None:
                        pool.append(nw)
            # hand a job to every idle worker
            for w in pool:
                if w.job is None and pending:
                    w.job = pending.pop()
                    try:
                        w.conn.send((w.job, tuple(jobs[w.job])))
                    except (OSError, EOFError, BrokenPipeError):
                        pass  # the worker died already: found below through its sentinel
            busy = [w for w in pool if w.job is not None]
            if not busy:
                # no worker could be started (or restarted): every job left fails with the reason
                why = start_error or "no worker process left"
                while pending:
                    i = pending.pop()
                    done += 1
                    yield i, JobError(why, worker_died=True)
                break
            ready = mp.connection.wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
            for w in busy:
                if w.conn in ready or w.proc.sentinel in ready:
                    got = None
                    try:
                        if w.conn.poll():
                            got = w.conn.recv()
                    except (EOFError, OSError):
                        got = None
                    except Exception as e:  # a result that cannot be unpickled
                        got = (w.job, JobError(f"result could not be read: {type(e).__name__}: {e}"))
                    if got is not None:
                        index, result = got
                        w.job = None
                        done += 1
                        yield index, result
                        continue
                    if w.proc.is_alive() and w.proc.sentinel not in ready:
                        continue
                    # the worker died holding its job: that job alone fails; a new worker takes its place
                    w.proc.join(1.0)
                    index = w.job
                    w.job = None
                    pool.remove(w)
                    with contextlib.suppress(Exception):
                        w.conn.close()
                    done += 1
                    why = describe_exit(w.proc.exitcode)
                    log.warning("worker process %s died (%s) while running job %s; starting a new one", w.proc.pid,
                                why, index)
                    yield index, JobError(f"worker process died ({why}) while processing it", worker_died=True)
                    if (pending or any(x.job is not None for x in pool)) and restarts < max_restarts:
                        restarts += 1
                        nw = start()
                        if nw is not None:
                            pool.append(nw)
    finally:
        for w in pool:
            w.stop()


def init_worker() -> None:
    """The worker initialiser of every batch command (``run_jobs(..., initializer=init_worker)``): one thread per
    worker process, since the workers are the parallelism (K workers x N threads would oversubscribe the cores).

    Sets ``OMP_NUM_THREADS=1`` unless the user set it, and torch's intra-op threads to 1 when torch is already
    loaded in the worker (preloaded by the forkserver of ``fvlm preprocess``).
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------- results
@dataclass
class VolumeResult:
    """What a batch command did with one volume."""

    split: str
    volume: str
    status: str  # ok | failed | skipped
    error: str = ""
    seconds: float = 0.0
    version: str = ""


@dataclass
class BatchSummary:
    """The per-volume results of one batch run (this run's volumes only)."""

    results: list[VolumeResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[VolumeResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def n_ok(self) -> int:
        return self.count("ok")

    @property
    def n_skipped(self) -> int:
        return self.count("skipped")

    @property
    def n_failed(self) -> int:
        return self.count("failed")

    @property
    def ok(self) -> bool:
        """Every volume of this run is done (processed now or complete already)."""
        return not self.failed


FAILURE_FIELDS = ("split", "volume", "error")


def write_failures(path: str | Path, rows: Iterable[Sequence[str]]) -> None:
    """The failures report of a batch command: ``split,volume,error`` rows (one line each, ``\\n`` line ends;
    atomic; just the header when none failed)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(FAILURE_FIELDS)
    for row in rows:
        w.writerow(row)
    atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------- subprocesses
def supervised(cmd: Sequence[str]) -> list[str]:
    """``cmd`` wrapped in the supervisor (``python -m fvlm.data.jobs --supervise MAIN_PID -- cmd ...``): start the
    result with ``start_new_session=True`` (see :func:`run_command`); the supervisor kills the whole process
    group (the command and everything it started) when this process dies, even by ``kill -9``."""
    return [sys.executable, "-m", "fvlm.data.jobs", "--supervise", str(os.getpid()), "--", *cmd]


def kill_group(pgid: int) -> None:
    """``SIGKILL`` to every process of the process group ``pgid`` (no error when it is empty)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@dataclass
class CommandResult:
    returncode: int
    output: str
    timed_out: bool = False


def run_command(cmd: Sequence[str], timeout: float = 0.0, env: dict[str, str] | None = None) -> CommandResult:
    """Run ``cmd`` in its own process group under the supervisor; stdout and stderr together in ``output``.

    On timeout, on return and on any exception (Ctrl-C included) the whole group is killed, grandchildren
    too; a ``kill -9`` of this process makes the supervisor kill it. ``OSError`` when Python cannot start.
    """
    proc = subprocess.Popen(supervised(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True, env=env)
    timed_out = False
    try:
        try:
            out, _ = proc.communicate(timeout=timeout or None)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc.pid)
            try:
                out, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:  # a process that left the group still holds the pipe
                proc.kill()
                out = ""
    finally:
        kill_group(proc.pid)  # whatever the command left running in its group
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return CommandResult(proc.returncode, out or "", timed_out)


def _supervise(main_pid: int, cmd: list[str]) -> int:
    """The supervisor: leader of its own process group; runs ``cmd`` in it and kills the group (itself
    included) as soon as ``main_pid`` is gone or it is told to stop."""
    def kill_all(*_: Any) -> None:
        os.killpg(0, signal.SIGKILL)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, kill_all)
    set_parent_death_signal(signal.SIGTERM)
    if not process_alive(main_pid):
        kill_all()

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_INTERVAL)
            if not process_alive(main_pid):
                kill_all()

    threading.Thread(target=watch, daemon=True).start()
    try:
        proc = subprocess.Popen(cmd)
    except OSError as e:
        sys.stderr.write(f"cannot run {cmd[0]}: {e}\n")
        return 127
    rc = proc.wait()
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":  # python -m fvlm.data.jobs --supervise MAIN_PID -- CMD ...
    if len(sys.argv) < 5 or sys.argv[1] != "--supervise" or sys.argv[3] != "--":
        sys.exit("usage: python -m fvlm.data.jobs --supervise MAIN_PID -- CMD [ARGS...]")
    sys.exit(_supervise(int(sys.argv[2]), sys.argv[4:]))
