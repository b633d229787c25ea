"""``fvlm preprocess``: one fused pass per volume, from CT-RATE files (or NIfTI pairs) to the processed store.

Per volume, in memory, with no intermediate files::

    read (.nii.gz, CRC-checked) -> v1 fix / v2 as is (detected per volume) -> check the label map
    -> the pass of :func:`fvlm.data.prepare.prepare_arrays` (reorient, merge, crop, resample, window, pad)
    -> store (atomic)

Batch behaviour: volumes that fail (corrupt file, missing metadata, label map mismatch, ...) get one line
in ``OUT/failures.csv`` and no output directory; the others are processed; the result is not ``ok`` (exit
code 1). A rerun skips exactly the volumes whose outputs are complete. ``shard`` and ``workers`` split the
work across jobs and processes. :func:`preprocess` is the whole command; :func:`run_preprocess` runs a job
list (:mod:`fvlm.data.joblist`); :func:`process_volume` is one volume.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.config import Config, DataConfig
from fvlm.data import ctrate, store
from fvlm.data.joblist import RejectedRow, VolumeJob, ctrate_jobs, pairs_jobs, parse_reconstructions, parse_shard
from fvlm.data.jobs import BatchSummary, JobError, VolumeResult, init_worker, run_jobs
from fvlm.data.labelmap import align_label
from fvlm.data.prepare import prepare_arrays
from fvlm.data.v1fix import fix_version, require_metadata
from fvlm.data.volume import check_finite, read_nifti
from fvlm.io import atomic_path, atomic_write_text
from fvlm.markers import clear_marker, write_marker

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- one volume
def process_volume(job: VolumeJob, out: str | Path, data_cfg: DataConfig, table: AnatomyTable) -> VolumeResult:
    """Run the pass for one volume and store it; never raises for a problem of the volume.

    On failure nothing of the volume remains in ``out`` except its failure record (one line in failures.csv).
    """
    t0 = time.perf_counter()
    version = ""
    try:
        require_metadata(job.metadata, job.version, job.volume, job.metadata_file)
        if not Path(job.label).exists():
            why = ""
            if job.version in ("auto", "v1") and job.metadata is not None:
                try:  # the usual reason a map is missing: fvlm segment could not fix this volume either
                    job.metadata.fix_geometry()
                except ValueError as e:
                    why = f"; note: {e} (needed if the volume is v1)"
            raise FileNotFoundError(f"label map {job.label} not found (segment the volume with TotalSegmentator v2, "
                                    f"task total, multilabel output){why}")
        image = read_nifti(job.image)
        try:
            check_finite(image.array)  # before version detection, whose statistics NaN would confuse
        except ValueError as e:
            raise ValueError(f"{job.image}: {e}") from None
        if image.array.size and image.array.min() == image.array.max():
            log.warning("%s: the image %s is constant (every voxel %s): not a CT scan, or an empty export?",
                        job.volume, job.image, image.array.flat[0])
        label = read_nifti(job.label)
        fixed = fix_version(image, job.metadata, job.version, job.volume, job.metadata_file)
        image, decision, slope, intercept = fixed.volume, fixed.decision, fixed.slope, fixed.intercept
        version = decision.version
        # label map on the scan's grid (reordered when only the axis order/direction differs); names both files
        label = align_label(image, label, label_name=f"label map {job.label}", image_name=f"scan {job.image}")
        try:
            img, msk, info = prepare_arrays(image, label, data_cfg, table, slope=slope, intercept=intercept)
        except ValueError as e:  # name the files (prepare_arrays works on arrays)
            raise ValueError(f"{e} (image {job.image}, label map {job.label})") from None
        seconds = time.perf_counter() - t0
        info["source"].update({"image": str(job.image), "label": str(job.label), "version": decision.version,
                               "version_reason": decision.reason, "evidence": decision.evidence,
                               "rescale": [slope, intercept]})
        meta = {"format": store.FORMAT_VERSION, "split": job.split, "volume": job.volume, "scan": job.scan,
                **info, "seconds": round(seconds, 3)}
        store.write_volume(out, job.split, job.volume, img, msk, meta)
        store.clear_failure(out, job.split, job.volume)
        return VolumeResult(job.split, job.volume, "ok", seconds=seconds, version=version)
    except Exception as e:  # a batch job records every per-volume failure and goes on
        error = str(e) if isinstance(e, (ValueError, FileNotFoundError)) else f"{type(e).__name__}: {e}"
        if not isinstance(e, (ValueError, FileNotFoundError, OSError)):
            log.warning("%s: unexpected %s", job.volume, type(e).__name__, exc_info=True)
        return _record_failure(job, out, error, time.perf_counter() - t0, version)


def _record_failure(job: VolumeJob, out: str | Path, error: str, seconds: float, version: str = "") -> VolumeResult:
    error = " ".join(error.split())  # one line
    try:
        store.remove_volume(out, job.split, job.volume)  # a damaged earlier output must not look valid
    except ValueError as e:  # not a directory this store wrote (or an unsafe name): left alone, and said so
        error = f"{error}; {' '.join(str(e).split())}"
    try:
        store.write_failure(out, job.split, job.volume, {"scan": job.scan, "error": error,
                                                         "seconds": round(seconds, 3), "version": version,
                                                         "image": job.image, "label": job.label})
    except (ValueError, OSError) as e:
        log.error("%s/%s: cannot record the failure (%s): %s", job.split, job.volume, e, error)
    log.debug("%s failed: %s", job.volume, error)
    return VolumeResult(job.split, job.volume, "failed", error=error, seconds=seconds, version=version)


def _worker(job: VolumeJob, out: str, data_cfg: DataConfig, table: AnatomyTable) -> VolumeResult:
    return process_volume(job, out, data_cfg, table)


# ----------------------------------------------------------------------------------------------- side files
def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copy(src, tmp)  # keeps the source's permission bits (mkstemp files are private)


def copy_side_files(root: str | Path, out: str | Path, splits: Sequence[str]) -> list[str]:
    """Copy anatomy texts, label and report CSVs of ``splits`` into ``out`` (when present); returns what was copied."""
    root, out = Path(root), Path(out)
    copied = []
    for name in ("desc_info.json", "conc_info.json"):
        src = ctrate.anatomy_texts_dir(root) / name
        if src.exists():
            _copy_atomic(src, out / "texts" / name)
            copied.append(f"texts/{name}")
    for split in splits:
        for src, dst in ((ctrate.labels_path(root, split), out / "labels" / f"{split}_labels.csv"),
                         (ctrate.reports_path(root, split), out / "reports" / f"{split}_reports.csv")):
            if src.exists():
                _copy_atomic(src, dst)
                copied.append(str(dst.relative_to(out)))
    return copied


def write_store_config(out: str | Path, data_cfg: DataConfig, table: AnatomyTable) -> None:
    """Write ``preprocess_config.json``, or refuse (``ValueError``) if ``out`` was made with other settings."""
    data = json.loads(json.dumps(asdict(data_cfg)))
    stored = store.read_store_config(out)
    if stored is not None:
        diffs = store.config_mismatch(stored, data, table.to_dict())
        if diffs:
            raise ValueError(f"{out} was preprocessed with other settings ({'; '.join(diffs)}); mixing them in one "
                             f"store would silently break training: use another --out or the same config")
        return
    atomic_write_text(Path(out) / store.CONFIG,
                      json.dumps({"data": data, "anatomy_table": table.to_dict()}, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------- the batch
@dataclass
class PreprocessResult(BatchSummary):
    """What one preprocessing run did: per-volume ``results`` of this run (this shard), input rows refused
    before any work (``rejected``, ``--pairs``), side files copied, and the store's totals afterwards."""

    out: Path = Path(".")
    rejected: list[RejectedRow] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    stage: str = ""  # completion marker (fvlm.markers), written when every volume of the run is done
    store_ok: int = 0  # volumes of the whole store (every split and shard so far), from manifest.csv
    store_failed: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.rejected

    @property
    def failures_csv(self) -> Path:
        return self.out / store.FAILURES

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "ok": self.ok, "processed": self.n_ok, "skipped": self.n_skipped,
                "failed": self.n_failed, "rejected": [asdict(r) for r in self.rejected], "copied": self.copied,
                "stage": self.stage, "store_ok": self.store_ok, "store_failed": self.store_failed,
                "results": [asdict(r) for r in self.results]}


def run_preprocess(jobs: Sequence[VolumeJob], out: str | Path, data_cfg: DataConfig, table: AnatomyTable,
                   workers: int = 1, shard: tuple[int, int] = (0, 1), limit: int = 0,
                   verify: bool = False) -> PreprocessResult:
    """Process ``jobs`` (after ``limit``, then ``shard``) into ``out``; rebuilds manifest.csv and failures.csv.

    Complete outputs are skipped; damaged ones are redone; leftover temporary directories of this shard's
    volumes are removed first.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_store_config(out, data_cfg, table)
    jobs = list(jobs)
    if limit > 0:
        jobs = jobs[:limit]
    i, n = shard
    jobs = jobs[i::n]
    summary = PreprocessResult(out=out)
    for split in sorted({j.split for j in jobs}):
        removed = store.clean_temporaries(out, split, {j.volume for j in jobs if j.split == split})
        if removed:
            log.info("removed %d temporary directories left by an interrupted run in %s/%s", removed, out, split)
    todo = []
    for j in jobs:
        if store.is_complete(out, j.split, j.volume, verify=verify):  # verify: content hashes too
            store.clear_failure(out, j.split, j.volume)
            summary.results.append(VolumeResult(j.split, j.volume, "skipped"))
        else:
            if store.volume_dir(out, j.split, j.volume).exists():
                log.info("%s/%s is damaged (%s): redoing it", j.split, j.volume,
                         store.check_volume_dir(store.volume_dir(out, j.split, j.volume), verify=verify))
            todo.append(j)
    log.info("preprocess: %d volumes in this shard, %d complete already, %d to do, %d worker(s)", len(jobs),
             len(jobs) - len(todo), len(todo), workers)
    with tqdm(total=len(todo), desc="preprocess", unit="vol", disable=None) as bar:
        if workers <= 1 or len(todo) <= 1:
            for j in todo:
                r = process_volume(j, out, data_cfg, table)
                summary.results.append(r)
                bar.update()
        else:
            # forkserver: workers fork from a clean server process (fork-safe, unlike forking a parent whose
            # OpenMP threads already ran) that imports torch once instead of once per worker. A worker that
            # dies (OOM killer) fails only the volume it held; a new one takes its place.
            args = [(j, str(out), data_cfg, table) for j in todo]
            for k, r in run_jobs(_worker, args, workers, context="forkserver",
                                 preload=["torch", "fvlm.data.preprocess"], initializer=init_worker):
                if isinstance(r, JobError):
                    j = todo[k]
                    store.clean_temporaries(out, j.split, {j.volume})  # what the dead worker was writing
                    r = _record_failure(j, out, r.error, 0.0)
                summary.results.append(r)
                bar.update()
    for r in summary.failed:
        log.error("%s/%s failed: %s", r.split, r.volume, r.error)
    summary.store_ok, summary.store_failed = store.rebuild_manifest(out, list(table.names))
    log.info("preprocess: %d done, %d skipped (complete), %d failed; %s holds %d ok, %d failed volumes%s",
             summary.n_ok, summary.n_skipped, summary.n_failed, out, summary.store_ok, summary.store_failed,
             f" (see {out / store.FAILURES})" if summary.store_failed else "")
    return summary


def preprocess(data: str | Path | None, out: str | Path, cfg: Config, *, splits: Sequence[str] | None = None,
               pairs: str | Path | None = None, default_split: str = "valid", workers: int = 1,
               shard: tuple[int, int] | str = (0, 1), version: str = "auto", reconstructions: int | str | None = "all",
               limit: int = 0, include_no_chest: bool = False, verify: bool = False) -> PreprocessResult:
    """``fvlm preprocess``: a CT-RATE root (``data``) or a ``pairs`` CSV of NIfTI image/label pairs -> the store
    ``out``, with ``OUT/failures.csv`` and, when every volume of this run is done, a completion marker.

    Args:
        data: CT-RATE-format root (dataset/, metadata/, ...); exactly one of ``data`` and ``pairs``.
        cfg: the configuration (``cfg.data``: spacing, margins, window, crop size, anatomy table).
        splits: splits of ``data`` (None: every split present on disk).
        pairs: CSV ``volume,image,label[,split]`` (images in HU); rows without a split get ``default_split``.
        shard: ``(i, N)`` or ``"i/N"``: only shard i of N (cluster job arrays); ``workers``: processes.
        version: ``auto`` (detected per volume), ``v1`` or ``v2``; ``reconstructions``: ``"all"`` or at most K per
            scan; ``limit``: the first N volumes only; ``include_no_chest``: keep the volumes of
            ``metadata/no_chest_{split}.txt``; ``verify``: check content hashes before skipping a volume.
    Returns:
        :class:`PreprocessResult` (``ok`` when every volume of this run succeeded and no row was refused).
    Raises:
        ValueError / FileNotFoundError for unusable arguments or inputs (nothing is written then), and when
        ``out`` holds a store made with other settings.
    """
    if bool(data) == bool(pairs):
        raise ValueError("give exactly one of --data (CT-RATE root) or --pairs (CSV of NIfTI image/label pairs)")
    table = load_anatomy_table(cfg.data.anatomy_table)
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    k = parse_reconstructions(reconstructions)
    rejected: list[RejectedRow] = []
    if data:
        splits = list(splits) if splits else [s for s in ctrate.SPLITS if (Path(data) / "dataset" / s).is_dir()
                                              or (Path(data) / "dataset" / f"{s}_fixed").is_dir()]
        jobs = ctrate_jobs(data, splits, version=version, reconstructions=k, exclude_no_chest=not include_no_chest)
    else:
        jobs = pairs_jobs(pairs, default_split=default_split, rejected=rejected)  # type: ignore[arg-type]
        splits = []
    if not jobs and not rejected:
        raise FileNotFoundError(f"no volumes found in {data or pairs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_store_config(out, cfg.data, table)  # refuse a mixed store before touching anything
    if pairs:  # rows refused for their names: reported in failures.csv, nothing written for them
        store.write_rejected_rows(out, [r.record() for r in rejected])
        for r in rejected:
            log.error("%s line %d refused: %s", r.source, r.line, r.error)
    copied: list[str] = []
    if data:
        copied = copy_side_files(data, out, splits)
        log.info("copied %s", ", ".join(copied) if copied else "no side files (texts, labels, reports absent)")
    # completion marker (fvlm.markers): cleared first, written last, only when every volume of this run is done
    stage = "preprocess-" + ("-".join(splits) if data else "pairs") + (f"-shard{shard[0]}of{shard[1]}"
                                                                       if shard[1] > 1 else "")
    settings = {"data": json.loads(json.dumps(asdict(cfg.data))), "anatomy_table": table.to_dict(),
                "source": str(Path(data or pairs).resolve()), "limit": limit,  # type: ignore[arg-type]
                "version": version, "reconstructions": "all" if k is None else str(reconstructions),
                "include_no_chest": bool(include_no_chest)}
    clear_marker(out, stage)
    result = run_preprocess(jobs, out, cfg.data, table, workers=workers, shard=shard, limit=limit, verify=verify)
    result.rejected, result.copied, result.stage = rejected, copied, stage
    if result.ok:
        write_marker(out, stage, config=settings, volumes=len(result.results), processed=result.n_ok,
                     skipped=result.n_skipped)
    return result
