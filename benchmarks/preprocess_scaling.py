"""Benchmark: `fvlm preprocess` throughput with 1 and 2 worker processes, peak memory per process, and an
estimate of the wall time for all of CT-RATE.

    python benchmarks/preprocess_scaling.py --volumes 16 --repeats 2

Input: `fvlm synth --size full` (CT-RATE v1 files, 512 x 512 x ~200 slices with label maps), the paper preset.
Each configuration runs the real command line (`python -m fvlm preprocess --workers K`) in a fresh output
directory, configurations interleaved repeat by repeat. While it runs, the resident memory of the command and
of every worker process it starts is sampled from /proc (VmHWM, the kernel's peak resident set of each
process), so "peak memory per worker" is the largest VmHWM of any worker process.

The estimate for CT-RATE (50,188 volumes) scales the measured seconds per volume and worker by the ratio of
the mean voxel count of the real CT-RATE validation volumes (official metadata: Rows x Columns x
NumberofSlices) to that of the synthetic volumes, and assumes the per-worker rate measured with 2 workers
holds for 32 workers on a 32-core machine (reading and resampling are per-volume, CPU-bound work with no
shared state; disk bandwidth is the assumption to check on a real machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # noqa: E402  (sibling module of the benchmarks)

REPO = Path(__file__).resolve().parents[1]
CT_RATE_VOLUMES = 50_188
log = logging.getLogger("bench.preprocess_scaling")


def _descendants(pid: int) -> dict[int, int]:
    """All descendants of ``pid`` -> their parent pid (from /proc/*/stat)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                parent[int(d.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    out: dict[int, int] = {}
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        for c, pp in parent.items():
            if pp == p:
                out[c] = p
                frontier.append(c)
    return out


def _hwm_mb(pid: int) -> tuple[float, str] | None:
    """(peak resident MB, command line) of a live process, None if gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024, cmd
    return None


def run_once(root: Path, out: Path, workers: int, config: str) -> dict:
    """One `fvlm preprocess` run; returns wall seconds, volumes done, and peak MB of the main process and workers."""
    cmd = [sys.executable, "-m", "fvlm", "preprocess", "--data", str(root), "--split", "train", "--out", str(out),
           "--config", config, "--workers", str(workers)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8", errors="replace")
    peaks: dict[int, tuple[float, str]] = {}
    parents: dict[int, int] = {}
    while proc.poll() is None:
        kids = _descendants(proc.pid)
        parents.update(kids)
        for pid in [proc.pid, *kids]:
            got = _hwm_mb(pid)
            if got is not None and got[0] >= peaks.get(pid, (0.0, ""))[0]:
                peaks[pid] = got
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"preprocess --workers {workers} failed (exit {proc.returncode}):\n{err[-3000:]}")
    with open(out / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    main_mb = peaks.get(proc.pid, (0.0, ""))[0]
    # pool workers are forked by the forkserver (a child of the command that does no volume work itself; its
    # children inherit its command line); the resource tracker is left out too
    servers = {pid for pid, (_, c) in peaks.items() if parents.get(pid) == proc.pid and "forkserver" in c}
    worker_mb = sorted((mb for pid, (mb, _) in peaks.items() if parents.get(pid) in servers), reverse=True)
    return {"wall_s": round(wall, 2), "volumes": len(rows), "main_peak_mb": round(main_mb, 1),
            "worker_peak_mb": [round(m, 1) for m in worker_mb[:workers]],
            "volume_seconds": [float(r["seconds"]) for r in rows if r.get("seconds")]}


def ct_rate_mean_voxels(metadata_csv: Path) -> float:
    import pandas as pd

    df = pd.read_csv(metadata_csv, usecols=["Rows", "Columns", "NumberofSlices"]).dropna()
    return float((df["Rows"] * df["Columns"] * df["NumberofSlices"]).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volumes", type=int, default=16, help="full-size synthetic volumes to process per run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--config", default="paper_vitb")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metadata", default=str(REPO / "tests" / "data" / "ct_rate" / "valid_metadata.csv"),
                   help="official CT-RATE metadata CSV whose volume sizes scale the estimate")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "preprocess_scaling.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    from fvlm.synth import synthesize

    tmp = Path(tempfile.mkdtemp(prefix="fvlm_bench_scaling_"))
    try:
        root = tmp / "ctrate_full"
        t = time.perf_counter()
        # patients have 1-3 reconstructions; keep one each so that the volume count is exact
        synthesize(str(root), n_train=args.volumes, n_valid=0, seed=args.seed, size="full", v2=False,
                   anatomy_table="released", workers=2, max_reconstructions=1)
        gen_s = time.perf_counter() - t
        shapes = []
        for meta in (root / "metadata").glob("train_metadata.csv"):
            with open(meta, newline="") as f:
                shapes = [int(r["Rows"]) * int(r["Columns"]) * int(r["NumberofSlices"]) for r in csv.DictReader(f)]
        synth_voxels = statistics.mean(shapes)
        inputs = [f for f in (root / "dataset" / "train").rglob("*.nii.gz")]
        input_mb = statistics.mean(f.stat().st_size for f in inputs) / 1e6
        runs: dict[int, list[dict]] = {w: [] for w in args.workers}
        for r in range(args.repeats):
            for w in args.workers:
                out = tmp / f"out_w{w}_r{r}"
                res = run_once(root, out, w, args.config)
                shutil.rmtree(out)
                runs[w].append(res)
                log.info("repeat %d, %d worker(s): %.1f s for %d volumes (%.1f volumes/min), peak MB main %.0f, "
                         "workers %s", r, w, res["wall_s"], res["volumes"], 60 * res["volumes"] / res["wall_s"],
                         res["main_peak_mb"], res["worker_peak_mb"])
        summary = {}
        for w, rs in runs.items():
            walls = [x["wall_s"] for x in rs]
            n = rs[0]["volumes"]
            summary[str(w)] = {
                "wall_s_min": min(walls), "wall_s_median": statistics.median(walls),
                "volumes_per_min_median": round(60 * n / statistics.median(walls), 1),
                "volumes_per_min_best": round(60 * n / min(walls), 1),
                "main_peak_mb_max": max(x["main_peak_mb"] for x in rs),
                "worker_peak_mb_max": max((m for x in rs for m in x["worker_peak_mb"]), default=None),
                "seconds_per_volume_in_worker_median": round(statistics.median(
                    [s for x in rs for s in x["volume_seconds"]]), 2),
            }
        real_voxels = ct_rate_mean_voxels(Path(args.metadata))
        scale = real_voxels / synth_voxels
        estimate = {}
        if "2" in summary and "1" in summary:
            v1, v2 = summary["1"]["volumes_per_min_median"], summary["2"]["volumes_per_min_median"]
            per_worker = v2 / 2 / scale  # volumes per minute per worker, at real CT-RATE sizes
            estimate = {
                "speedup_2_vs_1_workers": round(v2 / v1, 2),
                "ct_rate_mean_voxels": round(real_voxels), "synthetic_mean_voxels": round(synth_voxels),
                "voxel_ratio": round(scale, 2),
                "per_worker_volumes_per_min_at_ct_rate_size": round(per_worker, 2),
                "ct_rate_hours_32_workers": round(CT_RATE_VOLUMES / (per_worker * 32) / 60, 2),
                "memory_32_workers_gb": round(32 * (summary["2"]["worker_peak_mb_max"] or 0) * scale / 1024, 1),
                "synthetic_input_mb_per_volume": round(input_mb, 1),
                # the same rate needs this read bandwidth (compressed .nii.gz in, scaled to CT-RATE sizes)
                "read_mb_per_s_32_workers": round(per_worker * 32 * input_mb * scale / 60),
            }
        result = {"benchmark": "preprocess_scaling", "machine": machine(), "config": args.config,
                  "data": f"fvlm synth --size full --train {args.volumes} --valid 0 --seed {args.seed} "
                          f"(one reconstruction per patient; generated in {gen_s:.0f} s)",
                  "volumes": args.volumes, "repeats": args.repeats, "runs": {str(w): rs for w, rs in runs.items()},
                  "summary": summary, "estimate": estimate,
                  "note": "wall time of the whole command (start-up and imports included); warm page cache"}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        log.info("summary %s; estimate %s", summary, estimate)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
