"""``fvlm synth``: write a synthetic data set in CT-RATE's exact layout and formats.

Layout under ``out`` (``split`` is ``train`` or ``valid``; patients numbered from 1)::

    dataset/{split}/{split}_{pid}/{split}_{pid}_{scan}/{split}_{pid}_{scan}_{rec}.nii.gz   volumes (v1 or v2)
    dataset/{split}_mask/... same sub-paths                                                TotalSegmentator v2 maps
    metadata/train_metadata.csv, metadata/validation_metadata.csv                          44 official columns
    radiology_text_reports/train_reports.csv, radiology_text_reports/validation_reports.csv
    multi_abnormality_labels/train_predicted_labels.csv, .../valid_predicted_labels.csv
    anatomy_texts/desc_info.json, anatomy_texts/conc_info.json                             {scan_id: {anatomy: text}}
    synth_info.json                                                                        what generated this
    synth_truth.json                                                                       per-sentence truth

Volumes: v1 (default) like CT-RATE's original files: a default NIfTI header (identity affine: 1 mm, origin
0) and raw stored values ``(HU - RescaleIntercept) / RescaleSlope``; the true spacing, origin and direction
are only in the metadata CSV. v2 (``v2=True``) like CT-RATE's fixed files: int16 HU with the correct
affine. Arrays are built in LPS (z, y, x) and written as (x, y, z) with the RAS affine
``diag(-sx, -sy, sz)`` and origin ``(-ox, -oy, oz)``: SimpleITK then reads the LPS direction as identity.
Label maps always carry the correct (fixed) geometry.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fvlm.anatomy import load_anatomy_table
from fvlm.data.jobs import JobError, init_worker, run_jobs
from fvlm.data.volume import write_nifti_ras as write_nifti
from fvlm.io import atomic_write_text
from fvlm.labels import CT_RATE_LABELS
from fvlm.synth.case import (
    _GEOMETRY,
    _LABELS,
    _META,
    _NOISE,
    _REPORT,
    build_scene,
    draw_labels,
    patient_anatomy,
    render_volume,
    rng_for,
)
from fvlm.synth.metadata import (
    METADATA_COLUMNS,
    draw_n_reconstructions,
    metadata_row,
    plan_scan,
    recon_grid,
    study_date,
)
from fvlm.synth.reports import anatomy_texts, build_report
from fvlm.synth.signatures import DEFAULT_DIFFICULTY

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.1"
REPORT_COLUMNS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")
#: split -> (dataset folder and name prefix, metadata/report file prefix, labels file prefix)
SPLITS = {"train": ("train", "train", "train"), "valid": ("valid", "validation", "valid")}
_SPLIT_CODE = {"train": 0, "valid": 1}
_SCAN_LETTERS = "abcdefghi"
#: probability that a patient has a second (follow-up) scan
P_SECOND_SCAN = 0.2


@dataclass(frozen=True)
class ScanJob:
    out: str
    seed: int
    size: str
    v2: bool
    difficulty: float
    table: str
    split: str
    pid: int
    scan: int  # 0-based scan index (a, b, ...)
    max_reconstructions: int = 0  # > 0: at most this many reconstructions per scan


@dataclass
class ScanResult:
    split: str
    pid: int
    scan: int
    scan_id: str
    metadata: list[dict] = field(default_factory=list)
    labels: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    desc: dict = field(default_factory=dict)
    conc: dict = field(default_factory=dict)
    truth: dict = field(default_factory=dict)
    render_s: list[float] = field(default_factory=list)
    write_s: list[float] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    error: str = ""


@dataclass
class SynthResult:
    """What :func:`synthesize` wrote: ``info`` is the content of ``synth_info.json``; the rest describes this run
    (medians per volume, mask included in the bytes)."""

    out: Path
    info: dict[str, Any]
    seconds: float
    render_s_per_volume: float | None
    write_s_per_volume: float | None
    bytes_per_volume: float | None
    failed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """``info`` with this run's numbers (what ``synthesize`` returned as a dict before)."""
        return {**self.info, "seconds": self.seconds, "render_s_per_volume": self.render_s_per_volume,
                "write_s_per_volume": self.write_s_per_volume, "bytes_per_volume": self.bytes_per_volume,
                "failed": self.failed}


def volume_relpath(split: str, pid: int, scan: int, rec: int) -> Path:
    """``{split}/{split}_{pid}/{split}_{pid}_{scan}/{split}_{pid}_{scan}_{rec}.nii.gz`` (rec 1-based)."""
    prefix = SPLITS[split][0]
    p, s = f"{prefix}_{pid}", f"{prefix}_{pid}_{_SCAN_LETTERS[scan]}"
    return Path(p) / s / f"{s}_{rec}.nii.gz"


def _scan_dates(entropy: int, split: str, pid: int, n_scans: int) -> list[str]:
    rng = rng_for(entropy, _SPLIT_CODE[split], pid, _META)
    dates = [study_date(rng)]
    for _ in range(1, n_scans):
        dates.append(study_date(rng, after=dates[-1]))
    return dates


def n_scans_of(entropy: int, split: str, pid: int) -> int:
    rng = rng_for(entropy, _SPLIT_CODE[split], pid, _LABELS)
    return 2 if rng.random() < P_SECOND_SCAN else 1


def run_scan(job: ScanJob) -> ScanResult:
    """Generate and write every reconstruction of one scan; never raises (errors are returned)."""
    prefix = SPLITS[job.split][0]
    scan_id = f"{prefix}_{job.pid}_{_SCAN_LETTERS[job.scan]}"
    res = ScanResult(job.split, job.pid, job.scan, scan_id)
    try:
        _run_scan(job, res)
    except Exception as e:  # keep the batch going; the caller reports every failure at the end
        log.exception("scan %s failed", scan_id)
        res.error = f"{type(e).__name__}: {e}"
    return res


def _run_scan(job: ScanJob, res: ScanResult) -> None:
    out = Path(job.out)
    code = _SPLIT_CODE[job.split]
    pkey = (code, job.pid)
    skey = (code, job.pid, 1, job.scan)
    an0 = patient_anatomy(job.seed, pkey)
    labels = draw_labels(rng_for(job.seed, *skey, _LABELS))
    scene = build_scene(job.seed, skey, labels, an0, job.difficulty)
    an = scene.anatomy
    geo_rng = rng_for(job.seed, *skey, _GEOMETRY)
    n_rec = draw_n_reconstructions(geo_rng)
    if job.max_reconstructions:
        n_rec = min(n_rec, job.max_reconstructions)  # after the draw: the rest of the scan stays the same
    plan = plan_scan(geo_rng, an, job.size, n_rec)
    report = build_report(rng_for(job.seed, *skey, _REPORT), scene, slice_thickness=plan.z_spacing[0])
    date = _scan_dates(job.seed, job.split, job.pid, job.scan + 1)[job.scan]
    age = an.age + (int(date[:4]) - int(_scan_dates(job.seed, job.split, job.pid, 1)[0][:4]))
    res.labels = labels
    res.report = report.row("")
    res.desc, res.conc = anatomy_texts(report, job.table)
    res.truth = {"labels": labels, "sentences": [s.to_dict() for s in report.sentences],
                 "findings": [{"label": f.label, "severity": round(f.severity, 3), "lobes": list(f.lobes),
                               "details": _jsonable(f.details)} for f in scene.findings],
                 "anatomy": {"sex": an.sex, "age": age, "cardiothoracic_ratio": round(an.cardiothoracic_ratio, 3)}}
    intercept = plan.profile.intercept
    for rec in range(n_rec):
        grid, geom = recon_grid(plan, an, rec)
        rel = volume_relpath(job.split, job.pid, job.scan, rec + 1)
        name = rel.name
        t0 = time.perf_counter()
        kernel = "sharp" if plan.kernels[rec].sharp else "soft"
        hu, lab = render_volume(scene, grid, kernel, rng_for(job.seed, *skey, _NOISE, rec))
        t1 = time.perf_counter()
        if job.v2:
            nbytes = write_nifti(out / "dataset" / SPLITS[job.split][0] / rel, hu, grid.affine_ras)
        else:  # stored = (HU - intercept) / slope, slope 1
            stored = (hu.astype(np.int32) - intercept).astype(np.int16)
            nbytes = write_nifti(out / "dataset" / SPLITS[job.split][0] / rel, stored, None)
        nbytes += write_nifti(out / "dataset" / f"{SPLITS[job.split][0]}_mask" / rel, lab, grid.affine_ras)
        res.write_s.append(time.perf_counter() - t1)
        res.render_s.append(t1 - t0)
        res.nbytes.append(nbytes)
        res.metadata.append(metadata_row(name, plan, rec, geom, an.sex, age, date))


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return round(float(v), 3)
    return v


def _csv_text(columns, rows) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def synthesize(out, n_train: int = 8, n_valid: int = 4, seed: int = 0, size: str = "demo", v2: bool = False,
               anatomy_table: str = "released", workers: int = 1, difficulty: float = DEFAULT_DIFFICULTY,
               max_reconstructions: int = 0) -> SynthResult:
    """Write a synthetic CT-RATE-format data set to ``out`` (see the module docstring for the layout).

    Args:
        out: output root. n_train, n_valid: patients per split (each has 1, sometimes 2 scans, each scan
            1-3 reconstructions). seed: the same seed gives byte-identical files whatever ``workers`` is.
        size: "demo" (128-192 voxels in-plane at 1.8-2.6 mm, 4-6 mm slices) or "full" (512 x 512, 0.6-0.8 mm,
            200-400 slices). v2: write fixed HU volumes with true affines instead of CT-RATE v1 files.
        anatomy_table: table (name or JSON path) whose anatomies the anatomy texts describe.
        workers: processes (one job pool, :func:`fvlm.data.jobs.run_jobs`; 1 = in this process).
        difficulty: the lesion-severity knob (see :mod:`fvlm.synth.lesions`).
        max_reconstructions: > 0 caps the reconstructions per scan (e.g. 1 for a quick training set); the
            scans themselves (anatomy, findings, reports) do not change.
    Returns:
        what was written (``info``: the content of ``synth_info.json``) and how long it took.
    Raises:
        RuntimeError listing every scan that failed (all others are still written).
    """
    if size not in ("demo", "full"):
        raise ValueError(f"size must be 'demo' or 'full', got {size!r}")
    if n_train < 0 or n_valid < 0 or n_train + n_valid == 0:
        raise ValueError(f"need at least one patient (n_train={n_train}, n_valid={n_valid})")
    table = load_anatomy_table(anatomy_table)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for split, n in (("train", n_train), ("valid", n_valid)):
        for pid in range(1, n + 1):
            for scan in range(n_scans_of(seed, split, pid)):
                jobs.append(ScanJob(str(out), int(seed), size, bool(v2), float(difficulty), str(anatomy_table),
                                    split, pid, scan, int(max_reconstructions)))
    log.info("synthesising %d scans (%d train + %d valid patients, size %s, %s) into %s", len(jobs), n_train,
             n_valid, size, "v2" if v2 else "v1", out)
    t0 = time.perf_counter()
    results: list[ScanResult] = []
    bar = tqdm(total=len(jobs), desc="synth", unit="scan", disable=None)
    if workers > 1 and len(jobs) > 1:
        # a worker that dies (out of memory) fails only the scan it held; results keep the job order
        by_index: dict[int, ScanResult] = {}
        for k, r in run_jobs(run_scan, [(j,) for j in jobs], workers, context="spawn", initializer=init_worker):
            if isinstance(r, JobError):
                j = jobs[k]
                r = ScanResult(j.split, j.pid, j.scan, f"{SPLITS[j.split][0]}_{j.pid}_{_SCAN_LETTERS[j.scan]}",
                               error=r.error)
            by_index[k] = r
            bar.update(1)
        results = [by_index[k] for k in range(len(jobs))]
    else:
        for j in jobs:
            results.append(run_scan(j))
            bar.update(1)
    bar.close()
    failures = [r for r in results if r.error]

    for split in ("train", "valid"):
        rs = [r for r in results if r.split == split and not r.error]
        if not rs and not (n_train if split == "train" else n_valid):
            continue
        _, meta_prefix, lab_prefix = SPLITS[split]
        meta_rows = [m for r in rs for m in r.metadata]
        atomic_write_text(out / "metadata" / f"{meta_prefix}_metadata.csv", _csv_text(METADATA_COLUMNS, meta_rows))
        rep_rows = [{**r.report, "VolumeName": m["VolumeName"]} for r in rs for m in r.metadata]
        atomic_write_text(out / "radiology_text_reports" / f"{meta_prefix}_reports.csv",
                          _csv_text(REPORT_COLUMNS, rep_rows))
        lab_rows = [{"VolumeName": m["VolumeName"], **{k: str(r.labels[k]) for k in CT_RATE_LABELS}}
                    for r in rs for m in r.metadata]
        atomic_write_text(out / "multi_abnormality_labels" / f"{lab_prefix}_predicted_labels.csv",
                          _csv_text(("VolumeName", *CT_RATE_LABELS), lab_rows))
    ok = [r for r in results if not r.error]
    desc = {r.scan_id: r.desc for r in ok}
    conc = {r.scan_id: r.conc for r in ok if r.conc}
    atomic_write_text(out / "anatomy_texts" / "desc_info.json", json.dumps(desc, indent=1, ensure_ascii=False))
    atomic_write_text(out / "anatomy_texts" / "conc_info.json", json.dumps(conc, indent=1, ensure_ascii=False))
    atomic_write_text(out / "synth_truth.json", json.dumps({r.scan_id: r.truth for r in ok}, ensure_ascii=False))

    render_s = [v for r in ok for v in r.render_s]
    write_s = [v for r in ok for v in r.write_s]
    nbytes = [v for r in ok for v in r.nbytes]
    counts = {}
    for split, n in (("train", n_train), ("valid", n_valid)):
        rs = [r for r in ok if r.split == split]
        counts[split] = {"patients": n, "scans": len(rs), "volumes": sum(len(r.metadata) for r in rs)}
    info = {
        "generator": "fvlm.synth", "version": GENERATOR_VERSION, "seed": int(seed), "size": size, "v2": bool(v2),
        "difficulty": float(difficulty), "max_reconstructions": int(max_reconstructions),
        "anatomy_table": table.name, "counts": counts,
        "label_source": "whole label rows of CT-RATE train_predicted_labels.csv (Hamamci et al. 2024, "
                        "CC BY-NC-SA 4.0), weighted by frequency",
        "geometry": "arrays (z, y, x) in LPS; NIfTI (x, y, z) with RAS affine diag(-sx, -sy, sz)"
                    + ("" if v2 else "; v1 volumes: identity affine, stored = HU - RescaleIntercept"),
    }
    atomic_write_text(out / "synth_info.json", json.dumps(info, indent=2))
    summary = SynthResult(out, info, round(time.perf_counter() - t0, 2),
                          render_s_per_volume=float(np.median(render_s)) if render_s else None,
                          write_s_per_volume=float(np.median(write_s)) if write_s else None,
                          bytes_per_volume=float(np.median(nbytes)) if nbytes else None, failed=len(failures))
    log.info("wrote %d volumes in %.1f s (median render %.2f s, write %.2f s, %.1f MB per volume incl. mask)",
             len(render_s), summary.seconds, summary.render_s_per_volume or 0, summary.write_s_per_volume or 0,
             (summary.bytes_per_volume or 0) / 1e6)
    if failures:
        lines = "\n".join(f"  {r.scan_id}: {r.error}" for r in failures)
        raise RuntimeError(f"{len(failures)} of {len(jobs)} scans failed (the others were written):\n{lines}")
    return summary
