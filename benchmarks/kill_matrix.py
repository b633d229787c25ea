"""Kill matrix: ``kill -9`` at seeded random moments of real fvlm commands, then the same command again.

    python benchmarks/kill_matrix.py                       # full: 20 trials per command kind
    python benchmarks/kill_matrix.py --trials 2 --commands preprocess-main,segment --out /tmp/km.json

Command kinds (each a real ``python -m fvlm ...`` command line in a fresh directory):

- ``preprocess-main``: ``fvlm preprocess --workers 2`` (synthetic CT-RATE, both splits), the main process killed;
- ``preprocess-worker``: the same, one pool worker killed (as the kernel's OOM killer would);
- ``train``: ``fvlm train`` (tiny model, checkpoint every 2 steps), killed at a random moment, or, every
  other trial, the moment a checkpoint's temporary directory appears (during the checkpoint write);
- ``segment``: ``fvlm segment --workers 2`` with a stand-in TotalSegmentator (thresholds the HU into a label
  map after a short sleep) on v1 volumes (the fixed temporary copies are exercised);
- ``demo``: ``fvlm demo`` in a small-size configuration (tiny model, few patients, 4 steps).

Per trial: the kill time is ``uniform(0.05, 0.75) x`` the reference run's wall time (seeded; 0.4-0.75 for
worker kills, since workers exist only once the forkserver is up); after the kill, the
processes the command had started must be gone within 10 s (``orphans``); the outputs are scanned for
**partial files** (a visible output that is incomplete: a volume directory that does not check, a label map or
checkpoint that does not load, a log line cut short); the same command is run again (``train`` adds
``--resume`` when a checkpoint exists, as a job script would) and must exit 0; then the temporary files left
(``.tmp*``, ``.trash.*``, temporary segment folders) are counted and the final outputs compared with an
uninterrupted reference run: store arrays and meta.json (except timings) bit-equal, label maps voxel- and
affine-equal, training weights bit-equal and the loss curve (every logged value but throughput) equal, the
demo's scores.csv and metrics.json equal. Results go to ``benchmarks/results/kill_matrix.json`` after every
trial (a partial run leaves what it measured).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
KINDS = ("preprocess-main", "preprocess-worker", "train", "segment", "demo")
TINY = ["--config", "tiny"]
TRAIN_SET = ["--set", "train.epochs=8", "--set", "train.max_steps=6", "--set", "train.ckpt_every=2",
             "--set", "train.batch_size=2"]
DEMO_ARGS = ["--config", "tiny", "--train", "3", "--valid", "2", "--workers", "1", "--set", "train.max_steps=4",
             "--set", "train.batch_size=2", "--set", "train.epochs=4"]

STANDIN = '''#!{python}
import sys, time
import nibabel as nib
import numpy as np
args = sys.argv[1:]
inp, out = args[args.index("-i") + 1], args[args.index("-o") + 1]
img = nib.load(inp)
hu = np.asarray(img.dataobj)
time.sleep(0.3)
lab = np.zeros(hu.shape, dtype=np.uint8)
lab[(hu >= -950) & (hu < -500)] = 10   # lung_upper_lobe_left
lab[hu > 100] = 51                     # heart
nib.save(nib.Nifti1Image(lab, img.affine), out)
'''


def fvlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "fvlm", *args]


# ----------------------------------------------------------------------------------------------- processes
def _procs() -> dict[int, tuple[int, str, bytes]]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = Path(f"/proc/{d}/stat").read_text()
                cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            except OSError:
                continue
            rest = st[st.rindex(")") + 2:].split()
            out[int(d)] = (int(rest[1]), rest[0], cmd)
    return out


def descendants(pid: int) -> set[int]:
    t = _procs()
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = [q for q, (pp, state, _) in t.items() if pp == p and state != "Z"]
        found.update(kids)
        todo += kids
    return found


def pool_workers(pid: int) -> list[int]:
    """Worker processes of a command: children of its forkserver."""
    t = _procs()
    servers = [q for q in descendants(pid) if q in t and b"forkserver" in t[q][2]]
    return sorted(w for s in servers for w in descendants(s))


def wait_gone(pids: set[int], timeout: float = 10.0) -> int:
    """How many of ``pids`` are still alive after ``timeout`` s (those are then killed: no leftovers)."""
    from fvlm.data.jobs import process_alive

    end = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < end:
        alive = {p for p in alive if process_alive(p)}
        time.sleep(0.1)
    for p in alive:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(alive)


def run(argv: list[str], log: Path, timeout: float = 1800) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        r = subprocess.run(argv, env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    return r.returncode, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- checks
TEMP_MARKS = (".tmp", ".trash.", ".fvlm-segment-tmp")


def temporaries(root: Path) -> list[str]:
    """Temporary files and folders under ``root`` (what an interrupted writer leaves; hidden by name)."""
    out = []
    for p in root.rglob("*"):
        if any(p.name.startswith(m) or (m == ".tmp" and ".tmp" in p.name and p.name.startswith("."))
               for m in TEMP_MARKS):
            out.append(str(p.relative_to(root)))
    return sorted(out)


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def partial_store(out: Path) -> list[str]:
    from fvlm.data import store

    bad = []
    if not out.is_dir():
        return bad
    for split in store.splits(out):
        for d in (out / split).iterdir():
            if d.name.startswith("."):
                continue
            why = store.check_volume_dir(d)
            if why is not None:
                bad.append(f"{d.relative_to(out)}: {why}")
    for name in (store.MANIFEST, store.FAILURES):
        p = out / name
        if p.exists():
            text = p.read_text()
            if text and not text.endswith("\n"):
                bad.append(f"{name}: last line cut")
    return bad


def partial_maps(root: Path) -> list[str]:
    from fvlm.data.volume import read_nifti

    bad = []
    if root.is_dir():
        for p in root.rglob("*.nii.gz"):
            if _hidden(p, root):
                continue
            try:
                read_nifti(p)
            except Exception as e:  # noqa: BLE001 - any unreadable file is a partial output
                bad.append(f"{p.relative_to(root)}: {e}")
    return bad


def partial_run(run_dir: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    from fvlm.checkpoint import STATE, WEIGHTS

    bad = []
    ck = run_dir / "checkpoints"
    if ck.is_dir():
        for d in sorted(ck.glob("step_*")):
            try:
                load_file(str(d / WEIGHTS))
                json.loads((d / "config.json").read_text())
                json.loads((d / "anatomy_table.json").read_text())
                if (d / STATE).exists():
                    torch.load(d / STATE, weights_only=True)
                else:
                    bad.append(f"{d.name}: no {STATE}")
            except Exception as e:  # noqa: BLE001
                bad.append(f"{d.relative_to(run_dir)}: {type(e).__name__}: {e}")
        latest = ck / "latest"
        if latest.exists() and not (ck / latest.read_text().strip()).is_dir():
            bad.append(f"checkpoints/latest names a missing checkpoint {latest.read_text().strip()!r}")
    log = run_dir / "log.csv"
    if log.exists():
        text = log.read_text()
        if text and not text.endswith("\n"):
            bad.append("log.csv: last line cut")
    for name in ("config.json",):
        p = run_dir / name
        if p.exists():
            try:
                json.loads(p.read_text())
            except ValueError as e:
                bad.append(f"{name}: {e}")
    return bad


def partial_json(root: Path) -> list[str]:
    bad = []
    for p in root.glob("*.json"):
        try:
            json.loads(p.read_text())
        except ValueError as e:
            bad.append(f"{p.name}: {e}")
    return bad


def same_store(a: Path, b: Path) -> list[str]:
    import numpy as np

    from fvlm.data import store

    diffs = []
    for split in sorted(set(store.splits(a)) | set(store.splits(b))):
        va, vb = store.list_volumes(a, split), store.list_volumes(b, split)
        if va != vb:
            diffs.append(f"{split}: volumes {va} != {vb}")
            continue
        for v in va:
            x, y = store.open_volume(a, split, v, mmap=False), store.open_volume(b, split, v, mmap=False)
            if not (np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)):
                diffs.append(f"{split}/{v}: arrays differ")
            if _meta(x.meta) != _meta(y.meta):
                diffs.append(f"{split}/{v}: meta.json differs")
    return diffs


def _meta(meta: dict[str, Any]) -> dict[str, Any]:
    """meta.json without what may differ between equal runs: the wall time, the input files' folder."""
    out = {k: v for k, v in meta.items() if k != "seconds"}
    src = dict(out.get("source", {}))
    for k in ("image", "label"):
        if k in src:
            src[k] = Path(src[k]).name
    out["source"] = src
    return out


def same_maps(a: Path, b: Path) -> list[str]:
    import numpy as np

    from fvlm.data.volume import read_nifti

    fa = sorted(str(p.relative_to(a)) for p in a.rglob("*.nii.gz") if not _hidden(p, a))
    fb = sorted(str(p.relative_to(b)) for p in b.rglob("*.nii.gz") if not _hidden(p, b))
    if fa != fb:
        return [f"maps {fa} != {fb}"]
    diffs = []
    for f in fa:
        x, y = read_nifti(a / f), read_nifti(b / f)
        if not np.array_equal(x.array, y.array) or x.geometry != y.geometry:
            diffs.append(f"{f} differs")
    return diffs


def same_run(a: Path, b: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    from fvlm.checkpoint import WEIGHTS, latest_checkpoint

    ca, cb = latest_checkpoint(a), latest_checkpoint(b)
    if ca is None or cb is None or ca.name != cb.name:
        return [f"latest checkpoint {ca} vs {cb}"]
    diffs = []
    wa, wb = load_file(str(ca / WEIGHTS)), load_file(str(cb / WEIGHTS))
    if wa.keys() != wb.keys() or any(not torch.equal(wa[k], wb[k]) for k in wa):
        diffs.append("final weights differ")

    def curve(p: Path) -> list[dict[str, str]]:
        with open(p / "log.csv", newline="") as f:
            return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in csv.DictReader(f)]

    if curve(a) != curve(b):
        diffs.append("loss curve (log.csv) differs")
    return diffs


def same_demo(a: Path, b: Path) -> list[str]:
    diffs = []
    for name in ("scores.csv", "metrics.json"):
        if (a / name).read_bytes() != (b / name).read_bytes():
            diffs.append(f"{name} differs")
    ra, rb = (json.loads((p / "retrieval.json").read_text()) for p in (a, b))
    if {k: v for k, v in ra.items() if k != "file"} != {k: v for k, v in rb.items() if k != "file"}:
        diffs.append("retrieval.json differs")
    diffs += same_run(a / "run", b / "run")
    diffs += same_store(a / "processed", b / "processed")
    return diffs


# ----------------------------------------------------------------------------------------------- commands
class Matrix:
    """Inputs and reference (uninterrupted) outputs of every command, built once under ``work``."""

    def __init__(self, work: Path, kinds: list[str]):
        self.work = work
        self.log = work / "commands.log"
        self.ref_seconds: dict[str, float] = {}
        self.data = work / "data"
        t = time.perf_counter()
        rc, _ = run(fvlm("synth", "--out", str(self.data), "--train", "3", "--valid", "2", "--seed", "5",
                         "--max-reconstructions", "2"), self.log)
        assert rc == 0, f"synth failed: see {self.log}"
        self.ref = work / "ref"
        self.ref.mkdir()
        rc, secs = run(self.preprocess_argv(self.ref / "processed"), self.log)
        assert rc == 0, f"reference preprocess failed: see {self.log}"
        self.ref_seconds["preprocess-main"] = self.ref_seconds["preprocess-worker"] = secs
        if "train" in kinds:
            rc, secs = run(self.train_argv(self.ref / "run"), self.log)
            assert rc == 0, f"reference train failed: see {self.log}"
            self.ref_seconds["train"] = secs
        if "segment" in kinds:
            self.standin = work / "TotalSegmentator"
            self.standin.write_text(STANDIN.format(python=sys.executable))
            self.standin.chmod(0o755)
            self.seg_root = work / "seg"
            for sub in ("dataset/valid", "metadata"):
                shutil.copytree(self.data / sub, self.seg_root / sub)
            rc, secs = run(self.segment_argv(), self.log)
            assert rc == 0, f"reference segment failed: see {self.log}"
            shutil.copytree(self.seg_root / "dataset" / "valid_mask", self.ref / "maps")
            self.ref_seconds["segment"] = secs
        if "demo" in kinds:
            rc, secs = run(fvlm("demo", "--out", str(self.ref / "demo"), *DEMO_ARGS), self.log)
            assert rc == 0, f"reference demo failed: see {self.log}"
            self.ref_seconds["demo"] = secs
        self.setup_seconds = time.perf_counter() - t

    def preprocess_argv(self, out: Path) -> list[str]:
        return fvlm("preprocess", "--data", str(self.data), "--out", str(out), *TINY, "--workers", "2")

    def train_argv(self, out: Path) -> list[str]:
        return fvlm("train", "--data", str(self.ref / "processed"), "--out", str(out), *TINY, *TRAIN_SET)

    def segment_argv(self) -> list[str]:
        return fvlm("segment", "--data", str(self.seg_root), "--split", "valid", "--totalseg-cmd", str(self.standin),
                    "--workers", "2")

    # per kind: (argv, rerun argv, output root, partial check, compare)
    def plan(self, kind: str, d: Path) -> dict[str, Any]:
        if kind.startswith("preprocess"):
            out = d / "processed"
            return {"argv": self.preprocess_argv(out), "rerun": lambda: self.preprocess_argv(out), "root": out,
                    "partial": lambda: partial_store(out), "same": lambda: same_store(out, self.ref / "processed")}
        if kind == "train":
            out = d / "run"

            def rerun() -> list[str]:
                from fvlm.checkpoint import latest_checkpoint

                return self.train_argv(out) + (["--resume"] if latest_checkpoint(out) is not None else [])

            return {"argv": self.train_argv(out), "rerun": rerun, "root": out, "trigger": out / "checkpoints",
                    "partial": lambda: partial_run(out), "same": lambda: same_run(out, self.ref / "run")}
        if kind == "segment":
            masks = self.seg_root / "dataset" / "valid_mask"
            shutil.rmtree(masks, ignore_errors=True)
            return {"argv": self.segment_argv(), "rerun": self.segment_argv, "root": masks,
                    "partial": lambda: partial_maps(masks), "same": lambda: same_maps(masks, self.ref / "maps")}
        if kind == "demo":
            out = d / "demo"
            argv = fvlm("demo", "--out", str(out), *DEMO_ARGS)
            return {"argv": argv, "rerun": lambda: argv, "root": out,
                    "partial": lambda: (partial_maps(out / "data") + partial_store(out / "processed")
                                        + partial_run(out / "run") + partial_json(out)),
                    "same": lambda: same_demo(out, self.ref / "demo")}
        raise ValueError(kind)


def trial(m: Matrix, kind: str, index: int, rng: random.Random) -> dict[str, Any]:
    """One kill and rerun; when the command ended before the kill moment (the load varies), it is tried again
    (at most 3 times) from scratch with a moment drawn over the time that run took."""
    span = m.ref_seconds[kind]
    for attempt in range(1, 4):
        rec = _trial(m, kind, index, rng, span, retry=attempt < 3)
        if "uninterrupted_seconds" not in rec:
            rec["attempts"] = attempt
            return rec
        span = rec["uninterrupted_seconds"]
    raise AssertionError("unreachable")


def _trial(m: Matrix, kind: str, index: int, rng: random.Random, span: float, retry: bool) -> dict[str, Any]:
    d = m.work / "trials" / f"{kind}-{index:02d}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    plan = m.plan(kind, d)
    at_checkpoint = kind == "train" and index % 2 == 1
    # a worker exists only once the forkserver has imported torch (about half the run): kill in the second half
    # (up to 0.75 of the reference time: under a varying load a later moment often comes after the end)
    delay = rng.uniform(0.4 if kind == "preprocess-worker" else 0.05, 0.75) * span
    n_ckpt = rng.randint(1, 3)
    rec: dict[str, Any] = {"kind": kind, "trial": index, "target": "worker" if kind == "preprocess-worker" else "main",
                           "moment": "checkpoint write" if at_checkpoint else f"{delay:.2f} s"}
    log = d / "command.log"
    with open(log, "w") as f:
        p = subprocess.Popen(plan["argv"], env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.monotonic()
    killed = False
    seen_tmp = 0
    tree: set[int] = set()
    while p.poll() is None:
        now = time.monotonic() - t0
        fire = False
        if at_checkpoint:
            trig = plan["trigger"]
            tmps = list(trig.glob(".tmp-*")) if trig.is_dir() else []
            if tmps:
                seen_tmp = max(seen_tmp, len(list(trig.glob("step_*"))) + 1)
                fire = seen_tmp >= n_ckpt
        elif now >= delay:
            fire = True
        if fire:
            tree = descendants(p.pid)
            if kind == "preprocess-worker":
                workers = pool_workers(p.pid)
                if not workers:
                    time.sleep(0.01)
                    continue
                target = rng.choice(workers)
            else:
                target = p.pid
            try:
                os.kill(target, signal.SIGKILL)
                killed = True
                rec["killed_after_s"] = round(now, 2)
            except ProcessLookupError:
                pass
            break
        time.sleep(0.002 if at_checkpoint else 0.01)
    rc1 = p.wait(timeout=1800)
    if not killed and rc1 == 0 and retry:
        rec["killed"] = False
        rec["uninterrupted_seconds"] = time.monotonic() - t0
        return rec
    rec["killed"] = killed
    rec["first_exit"] = rc1
    rec["orphans"] = wait_gone(tree - {p.pid}) if killed else 0
    partial = plan["partial"]()
    rec["partial_files"] = partial
    rc2, secs = run(plan["rerun"](), log)
    rec["rerun_exit"] = rc2
    rec["rerun_seconds"] = round(secs, 2)
    rec["temporaries_after_rerun"] = temporaries(plan["root"])
    rec["diffs"] = plan["same"]() if rc2 == 0 else ["rerun failed"]
    rec["equal"] = rc2 == 0 and not rec["diffs"]
    if rec["equal"] and not partial and not rec["temporaries_after_rerun"] and not rec["orphans"]:
        shutil.rmtree(d, ignore_errors=True)  # keep only the trials worth a look
    return rec


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for kind in KINDS:
        ts = [t for t in trials if t["kind"] == kind]
        if not ts:
            continue
        out[kind] = {"trials": len(ts), "killed": sum(t["killed"] for t in ts),
                     "partial_files": sum(len(t["partial_files"]) for t in ts),
                     "orphans": sum(t["orphans"] for t in ts),
                     "reruns_finished": sum(t["rerun_exit"] == 0 for t in ts),
                     "temporaries_after_rerun": sum(len(t["temporaries_after_rerun"]) for t in ts),
                     "equal_to_uninterrupted": sum(t["equal"] for t in ts)}
        if kind == "train":
            out[kind]["killed_during_checkpoint_write"] = sum(t["moment"] == "checkpoint write" and t["killed"]
                                                              for t in ts)
    return out


def markdown(summary: dict[str, Any]) -> str:
    """The summary as the table of benchmarks/README.md."""
    lines = ["| command | trials (killed) | partial files | orphans after 10 s | reruns finished | temporaries after "
             "rerun | equal to an uninterrupted run |", "|---|---|---|---|---|---|---|"]
    names = {"preprocess-main": "`fvlm preprocess --workers 2`, main process",
             "preprocess-worker": "`fvlm preprocess --workers 2`, one worker",
             "train": "`fvlm train` (random moment / checkpoint write)",
             "segment": "`fvlm segment --workers 2` (stand-in TotalSegmentator)", "demo": "`fvlm demo` (small)"}
    for kind, s in summary.items():
        trials = f"{s['trials']} ({s['killed']})"
        if kind == "train":
            trials += f", {s['killed_during_checkpoint_write']} during a checkpoint write"
        lines.append(f"| {names[kind]} | {trials} | {s['partial_files']} | {s['orphans']} | "
                     f"{s['reruns_finished']} | {s['temporaries_after_rerun']} | {s['equal_to_uninterrupted']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="trials per command kind")
    ap.add_argument("--commands", default=",".join(KINDS), help=f"comma-separated kinds of {', '.join(KINDS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="", help="work folder (default: a temporary folder, removed at the end)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "kill_matrix.json"))
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only combine result files of separate runs (e.g. run in parallel) into --out")
    args = ap.parse_args(argv)
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        trials = [dict(t, run=i) for i, r in enumerate(runs) for t in r["trials"]]
        merged = {"benchmark": "kill_matrix", "runs": [{k: v for k, v in r.items() if k != "trials"} for r in runs],
                  "summary": summarize(trials), "trials": trials}
        Path(args.out).write_text(json.dumps(merged, indent=1) + "\n")
        print(markdown(merged["summary"]))
        return 0
    kinds = [k for k in args.commands.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        ap.error(f"unknown command kinds {sorted(unknown)}")
    import tempfile

    from machine import machine

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fvlm_kill_matrix_"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    m = Matrix(work, kinds)
    result: dict[str, Any] = {"benchmark": "kill_matrix", "seed": args.seed, "trials_per_kind": args.trials,
                              "machine": machine(), "reference_seconds": {k: round(v, 2) for k, v in
                                                                          m.ref_seconds.items()},
                              "summary": {}, "trials": []}
    t0 = time.perf_counter()
    # interleave the kinds trial by trial: a partial run still covers every command
    for i in range(args.trials):
        for kind in kinds:
            rec = trial(m, kind, i, rng)
            result["trials"].append(rec)
            result["summary"] = summarize(result["trials"])
            result["seconds"] = round(time.perf_counter() - t0, 1)
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            os.replace(tmp, out)
            print(f"{kind} #{i}: killed={rec['killed']} partial={len(rec['partial_files'])} "
                  f"orphans={rec['orphans']} rerun={rec['rerun_exit']} equal={rec['equal']} "
                  f"temporaries={len(rec['temporaries_after_rerun'])} {rec['diffs'][:2]}", flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result["summary"], indent=1))
    bad = [k for k, s in result["summary"].items()
           if s["partial_files"] or s["orphans"] or s["reruns_finished"] < s["trials"]
           or s["equal_to_uninterrupted"] < s["trials"] or s["temporaries_after_rerun"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
