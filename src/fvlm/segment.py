"""``fvlm segment``: TotalSegmentator v2 (task ``total``) label maps for CT-RATE volumes or NIfTI pairs.

Per volume::

    read -> v1 fix (detected per volume, as in fvlm preprocess) -> write the fixed volume to a temporary .nii
    (TotalSegmentator needs a file; v2/HU inputs are passed as they are) -> TotalSegmentator
    -i IN -o TMP --ml --task total --roi_subset <classes of the anatomy table> [--fast] [--device D]
    -> check the map (readable, same grid as the fixed volume, ids 0..117) -> rename onto
    dataset/{split}_mask/<same sub-path>  (the layout fvlm preprocess reads)

``roi_subset`` is exactly the TotalSegmentator classes the anatomy table merges
(:attr:`fvlm.anatomy.AnatomyTable.class_ids`), which makes TotalSegmentator crop to them with its 6 mm model
first and run only the sub-models that hold them. With ``--ml`` and ``--roi_subset`` TotalSegmentator keeps
the ``total`` class ids and zeroes every other class, so the map is read exactly like a full one.

TotalSegmentator runs in one of two ways: the Python API (``totalsegmentator.python_api.totalsegmentator``,
when the optional extra ``fvlm[segment]`` is installed in this environment) or a command (``--totalseg-cmd
PATH``, or ``TotalSegmentator`` found on ``PATH``) invoked as a subprocess with the CLI flags of
TotalSegmentator 2.x (``totalsegmentator/bin/TotalSegmentator.py``: ``-i``, ``-o``, ``--ml``, ``--task``,
``--roi_subset``, ``--fast``, ``--device``). Pre-downloaded weights are found through ``TOTALSEG_HOME_DIR`` /
``TOTALSEG_WEIGHTS_PATH``, which the subprocess inherits.

Batch behaviour: outputs are written under a temporary name and renamed when checked, so a map that exists
is complete; a rerun skips volumes whose map exists and matches the volume's header (shape and geometry;
``verify="full"`` also inflates it); every failure is collected, listed at the end and written to a
failures CSV, the other volumes go on, and the exit code is 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.data.joblist import RejectedRow, VolumeJob, ctrate_jobs, pairs_jobs, parse_reconstructions, parse_shard
from fvlm.data.jobs import BatchSummary, JobError, VolumeResult, init_worker, run_command, run_jobs, write_failures
from fvlm.data.labelmap import align_label, class_ids, grid_mapping
from fvlm.data.v1fix import fix_version, require_metadata, rescale
from fvlm.data.volume import SourceVolume, check_finite, read_header, read_nifti, write_nifti
from fvlm.io import atomic_path
from fvlm.totalseg import CLASS_NAMES, MAX_CLASS_ID

log = logging.getLogger(__name__)

_DEVICE = re.compile(r"^(gpu(:\d+)?|cpu|mps)$")
_OUTPUT_TAIL = 2000  # characters of a failed command's output kept in its error


# ----------------------------------------------------------------------------------------------- runners
def roi_subset(table: AnatomyTable) -> list[str]:
    """TotalSegmentator class names the table's anatomies merge, in class-id order (``--roi_subset``)."""
    return [CLASS_NAMES[i] for i in table.class_ids]


def totalseg_arguments(image: str | Path, output: str | Path, roi: Sequence[str], fast: bool = False,
                       device: str | None = None, task: str = "total") -> list[str]:
    """The TotalSegmentator 2.x CLI arguments (without the program) for one multilabel segmentation."""
    args = ["-i", str(image), "-o", str(output), "--ml", "--task", task]
    if roi:
        args += ["--roi_subset", *roi]
    if fast:
        args.append("--fast")
    if device:
        args += ["--device", device]
    return args


@dataclass(frozen=True)
class TotalSegmentator:
    """How to run TotalSegmentator: ``command`` (a subprocess) or, when ``command`` is empty, the Python API."""

    command: tuple[str, ...] = ()
    roi: tuple[str, ...] = ()
    fast: bool = False
    device: str | None = None
    task: str = "total"
    timeout: float = 0.0  # seconds per volume (subprocess only); 0 = none

    @property
    def in_process(self) -> bool:
        return not self.command

    def describe(self) -> str:
        how = "python API (totalsegmentator.python_api)" if self.in_process else " ".join(self.command)
        return (f"{how}, task {self.task}, {len(self.roi)} roi_subset classes"
                f"{', --fast' if self.fast else ''}{f', --device {self.device}' if self.device else ''}")

    def run(self, image: Path, output: Path) -> None:
        """Segment ``image`` into the multilabel map ``output``; ``RuntimeError`` with the tool's output on failure."""
        if self.in_process:
            self._run_api(image, output)
            return
        cmd = [*self.command, *totalseg_arguments(image, output, self.roi, self.fast, self.device, self.task)]
        log.debug("running %s", " ".join(cmd))
        # its own process group, killed whole (grandchildren too) on timeout, on return and when fvlm dies
        try:
            proc = run_command(cmd, timeout=self.timeout)
        except OSError as e:
            raise RuntimeError(f"cannot run {self.command[0]}: {e}") from None
        if proc.timed_out:
            raise RuntimeError(f"TotalSegmentator timed out after {self.timeout:g} s (its processes were killed)")
        if proc.returncode != 0:
            tail = " | ".join(proc.output.strip().splitlines())[-_OUTPUT_TAIL:]
            raise RuntimeError(f"TotalSegmentator exited with code {proc.returncode}: {tail or '(no output)'}")

    def _run_api(self, image: Path, output: Path) -> None:
        # optional dependency (fvlm[segment]), imported only when this way of running it was chosen
        from totalsegmentator.python_api import totalsegmentator

        kwargs: dict[str, Any] = {"ml": True, "fast": self.fast, "task": self.task, "quiet": True,
                                  "roi_subset": list(self.roi) or None}
        if self.device:
            kwargs["device"] = self.device
        try:
            totalsegmentator(image, output, **kwargs)
        except SystemExit as e:  # TotalSegmentator exits on licence/config problems
            raise RuntimeError(f"TotalSegmentator exited ({e.code})") from None


def find_totalsegmentator(command: str | None, roi: Sequence[str], fast: bool = False, device: str | None = None,
                          task: str = "total", timeout: float = 0.0) -> TotalSegmentator:
    """Resolve how to run TotalSegmentator: ``command`` (path or name on PATH) if given, else the Python API if
    importable, else ``TotalSegmentator`` on PATH. ``FileNotFoundError`` explains the options when none works."""
    if device is not None and not _DEVICE.match(device):
        raise ValueError(f"--device must be gpu, gpu:N, cpu or mps, got {device!r}")
    if command:
        exe = shutil.which(command) or (command if Path(command).is_file() else None)
        if exe is None:
            raise FileNotFoundError(f"--totalseg-cmd {command!r}: no such executable")
        if not os.access(exe, os.X_OK):
            raise FileNotFoundError(f"--totalseg-cmd {exe}: not executable (chmod +x?)")
        return TotalSegmentator((str(exe),), tuple(roi), fast, device, task, timeout)
    try:  # is the optional dependency (fvlm[segment]) installed here?
        import totalsegmentator.python_api  # noqa: F401
        return TotalSegmentator((), tuple(roi), fast, device, task, timeout)
    except ImportError:
        pass
    exe = shutil.which("TotalSegmentator")
    if exe:
        return TotalSegmentator((exe,), tuple(roi), fast, device, task, timeout)
    raise FileNotFoundError("TotalSegmentator not found: pip install 'fvlm[segment]' in this environment, or install "
                            "TotalSegmentator in another one and pass --totalseg-cmd /path/to/TotalSegmentator")


# ----------------------------------------------------------------------------------------------- jobs
@dataclass
class SegmentResult(VolumeResult):
    classes_found: int = 0  # distinct classes in the map written


@dataclass
class SegmentSummary(BatchSummary):
    """The per-volume results of one ``fvlm segment`` run; ``failures_csv``: where the failures were listed
    (``None`` when nothing was written: no failure and no earlier list)."""

    failures_csv: Path | None = None
    roi: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "segmented": self.n_ok, "skipped": self.n_skipped, "failed": self.n_failed,
                "failures_csv": str(self.failures_csv) if self.failures_csv else None, "roi": self.roi,
                "results": [asdict(r) for r in self.results]}


def ctrate_segment_jobs(root: str | Path, split: str, version: str = "auto", reconstructions: int | None = None,
                        exclude_no_chest: bool = True) -> list[VolumeJob]:
    """Jobs for the volumes of a CT-RATE root's split on disk; each map goes to ``job.label``
    (``dataset/{split}_mask/``): the same selection as fvlm preprocess (no_chest list honoured there, unless
    asked otherwise)."""
    return ctrate_jobs(root, [split], version=version, reconstructions=reconstructions,
                       exclude_no_chest=exclude_no_chest)


def pairs_segment_jobs(csv_path: str | Path, default_split: str = "valid",
                       rejected: list[RejectedRow] | None = None) -> list[VolumeJob]:
    """Jobs from a ``volume,image,label[,split]`` CSV (the ``fvlm preprocess --pairs`` format): each image (HU,
    correct header) is segmented into its ``label`` path. Rows whose volume or split is not a safe name are
    refused as in :func:`fvlm.data.joblist.pairs_jobs` (appended to ``rejected`` when it is a list)."""
    jobs = []
    for j in pairs_jobs(csv_path, default_split, rejected=rejected):
        if Path(j.label).resolve() == Path(j.image).resolve():  # the map would overwrite the scan
            msg = f"{csv_path}: volume {j.volume!r}: label path {j.label} is the image itself; refusing to overwrite it"
            if rejected is None:
                raise ValueError(msg)
            rejected.append(RejectedRow(str(csv_path), 0, j.split, j.volume, msg))
            continue
        jobs.append(j)
    return jobs


# ----------------------------------------------------------------------------------------------- one volume
def load_fixed(job: VolumeJob) -> tuple[SourceVolume, str]:
    """The volume as TotalSegmentator must see it: HU with the true geometry.

    Returns (:class:`~fvlm.data.volume.SourceVolume` with int16 HU or the stored values of an HU input,
    version). v1 volumes get the released fix (:func:`fvlm.data.v1fix.fix_version`: metadata geometry,
    ``stored * slope + intercept``).
    """
    require_metadata(job.metadata, job.version, job.volume, job.metadata_file)
    vol = read_nifti(job.image)
    check_finite(vol.array)
    fixed = fix_version(vol, job.metadata, job.version, job.volume, job.metadata_file)
    if fixed.version != "v1":
        return fixed.volume, fixed.version
    return SourceVolume(rescale(vol.array, fixed.slope, fixed.intercept), fixed.volume.geometry), "v1"


def check_label_map(path: str | Path, image: SourceVolume) -> int:
    """``ValueError`` unless ``path`` is a readable integer label map on ``image``'s grid with ids 0..117;
    returns the number of distinct classes in it."""
    # the same grid in another axis order/direction is accepted (every reader of label maps reorders it)
    a = class_ids(align_label(image, read_nifti(path), label_name=f"label map {path}").array, f"label map {path}")
    counts = np.zeros(MAX_CLASS_ID + 1, dtype=np.int64)
    for k in range(a.shape[0]):  # slice by slice: a whole-volume int64 copy of a 512 x 512 x 600 map is 1.2 GB
        counts += np.bincount(a[k].astype(np.intp, copy=False).ravel(), minlength=MAX_CLASS_ID + 1)
    return int(np.count_nonzero(counts[1:]))


def output_is_complete(job: VolumeJob, verify: str = "header") -> bool:
    """Whether ``job.label`` holds a finished map for this volume: header shape equal to the source's and its
    geometry equal to the source header's (v2/HU) or the metadata's (v1); ``verify="full"`` inflates the map too."""
    out = Path(job.label)
    if not out.exists():
        return False
    try:
        mh = read_header(out)
        sh = read_header(job.image)
        candidates = [sh.geometry]
        if job.metadata is not None and job.version in ("auto", "v1"):
            try:
                candidates.append(job.metadata.fix_geometry())
            except ValueError:
                pass
        ok = False
        for g in candidates:
            try:
                # header only (no voxel data is touched); another axis order/direction of the same grid is fine
                grid_mapping(g, tuple(sh.shape_xyz[:3])[::-1], mh.geometry, tuple(mh.shape_xyz[:3])[::-1])
                ok = True
                break
            except ValueError:
                continue
        if not ok:
            return False
        if verify == "full":
            read_nifti(out)
        return True
    except (ValueError, OSError):
        return False


def _remove_stale_temporaries(output: Path) -> None:
    """Temporary files an interrupted run left for this output (``.{name}.*.tmp.nii.gz`` next to it)."""
    if output.parent.is_dir():
        for p in output.parent.glob(f".{output.name}.*.tmp*"):
            p.unlink(missing_ok=True)


#: folder (under ``--tmp-dir``, by default next to the outputs) of the fixed copies handed to TotalSegmentator
TMP_FOLDER = ".fvlm-segment-tmp"


def default_tmp_dir(failures: str | Path) -> Path:
    """Where fixed copies go by default: next to the failures CSV (``dataset/{split}_mask/`` or the pairs CSV's
    folder), never the system temp folder (a killed run's copies are found and removed by the next run)."""
    return Path(failures).parent


def clean_tmp(tmp_dir: str | Path | None, volumes: set[str]) -> int:
    """Remove the temporary folders an interrupted run left for ``volumes`` (only ``{volume}.{random}`` folders
    under :data:`TMP_FOLDER`, which only :func:`segment_volume` creates); returns how many."""
    if tmp_dir is None:
        return 0
    d = Path(tmp_dir) / TMP_FOLDER
    n = 0
    if d.is_dir():
        for p in d.iterdir():
            if p.is_dir() and not p.is_symlink() and p.name.rsplit(".", 1)[0] in volumes:
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty
    return n


def segment_volume(job: VolumeJob, runner: TotalSegmentator, tmp_dir: str | Path | None = None) -> SegmentResult:
    """Segment one volume into ``job.label`` (atomic); never raises for a problem of the volume.

    A v1 volume's fixed copy is written under ``tmp_dir/.fvlm-segment-tmp/{volume}.{random}/`` (the system
    temp folder when ``tmp_dir`` is None) and removed afterwards.
    """
    t0 = time.perf_counter()
    version = ""
    output = Path(job.label)
    try:
        _remove_stale_temporaries(output)
        image, version = load_fixed(job)
        tmp_root = None
        if tmp_dir is not None:
            tmp_root = Path(tmp_dir) / TMP_FOLDER
            tmp_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{job.volume}.", dir=tmp_root) as td:
            if version == "v1":
                # uncompressed: TotalSegmentator reads it once; compressing 300 MB would cost seconds for nothing
                src = Path(td) / f"{job.volume}.nii"
                write_nifti(src, image.array, image.geometry)
            else:
                src = Path(job.image)
            with atomic_path(output, suffix=".nii.gz") as tmp:
                runner.run(src, tmp)
                if not tmp.exists() or tmp.stat().st_size == 0:
                    raise RuntimeError("TotalSegmentator reported success but wrote no label map")
                n_classes = check_label_map(tmp, image)
        if n_classes == 0:
            log.warning("%s: no class of the roi_subset was found (non-chest volume?)", job.volume)
        return SegmentResult(job.split, job.volume, "ok", seconds=time.perf_counter() - t0, version=version,
                             classes_found=n_classes)
    except Exception as e:  # a batch job records every per-volume failure and goes on
        if isinstance(e, (ValueError, FileNotFoundError, RuntimeError, OSError)):
            error = str(e)
        else:
            log.warning("%s: unexpected %s", job.volume, type(e).__name__, exc_info=True)
            error = f"{type(e).__name__}: {e}"
        return SegmentResult(job.split, job.volume, "failed", error=" ".join(error.split()),
                             seconds=time.perf_counter() - t0, version=version)


# ----------------------------------------------------------------------------------------------- the batch
def run_segment(jobs: Sequence[VolumeJob], runner: TotalSegmentator, workers: int = 1,
                shard: tuple[int, int] = (0, 1), limit: int = 0, verify: str = "header",
                tmp_dir: str | None = None) -> SegmentSummary:
    """Segment ``jobs`` (after ``limit``, then ``shard``); complete outputs are skipped."""
    jobs = list(jobs)
    if limit > 0:
        jobs = jobs[:limit]
    i, n = shard
    jobs = jobs[i::n]
    summary = SegmentSummary()
    removed = clean_tmp(tmp_dir, {j.volume for j in jobs})
    if removed:
        log.info("removed %d temporary folder(s) left by an interrupted run under %s", removed,
                 Path(tmp_dir or ".") / TMP_FOLDER)
    todo = []
    for j in jobs:
        if output_is_complete(j, verify):
            summary.results.append(SegmentResult(j.split, j.volume, "skipped"))
        else:
            todo.append(j)
    log.info("segment: %d volumes in this shard, %d complete already, %d to do, %d worker(s); %s", len(jobs),
             len(jobs) - len(todo), len(todo), workers, runner.describe())
    with tqdm(total=len(todo), desc="segment", unit="vol", disable=None) as bar:
        if workers <= 1 or len(todo) <= 1:
            for j in todo:
                summary.results.append(segment_volume(j, runner, tmp_dir))
                bar.update()
        else:
            if runner.in_process:
                # the Python API runs torch in this process: one process per worker (spawn: CUDA-safe); a dead
                # worker (out of memory) fails only its volume
                for k, r in run_jobs(segment_volume, [(j, runner, tmp_dir) for j in todo], workers, context="spawn",
                                     initializer=init_worker):
                    if isinstance(r, JobError):
                        r = SegmentResult(todo[k].split, todo[k].volume, "failed", error=r.error)
                    summary.results.append(r)
                    bar.update()
            else:  # subprocesses do the work; threads only read, fix and wait
                with ThreadPoolExecutor(max_workers=workers) as ex:
                    futures = {ex.submit(segment_volume, j, runner, tmp_dir): j for j in todo}
                    for fut in as_completed(futures):
                        summary.results.append(fut.result())  # segment_volume never raises
                        bar.update()
    clean_tmp(tmp_dir, set())  # the (now empty) temporary folder itself
    for r in summary.failed:
        log.error("%s failed: %s", r.volume, r.error)
    done = [r for r in summary.results if r.status == "ok"]
    secs = sorted(r.seconds for r in done)
    log.info("segment: %d done%s, %d skipped (complete), %d failed", len(done),
             f" (median {secs[len(secs) // 2]:.1f} s per volume)" if secs else "", summary.count("skipped"),
             len(summary.failed))
    return summary


def segment(data: str | Path | None = None, *, split: str | None = None, pairs: str | Path | None = None,
            anatomy_table: str = "released", totalseg_cmd: str = "", fast: bool = False, device: str | None = None,
            task: str = "total", timeout: float = 0.0, workers: int = 1, shard: tuple[int, int] | str = (0, 1),
            version: str = "auto", reconstructions: int | str | None = "all", include_no_chest: bool = False,
            limit: int = 0, verify: str = "header", tmp_dir: str | Path | None = None,
            failures: str | Path | None = None) -> SegmentSummary:
    """``fvlm segment``: TotalSegmentator label maps for a CT-RATE root's ``split`` (``data``; maps go to
    ``dataset/{split}_mask/``) or the rows of a ``pairs`` CSV (maps go to each row's label path).

    Failures (and input rows refused for their names) are listed in ``failures`` (default:
    ``dataset/{split}_mask/segment_failures.csv``, or ``{pairs stem}_segment_failures.csv`` next to the CSV;
    ``.shard{i}of{N}`` inserted for a shard), rewritten whenever it exists. ``tmp_dir``: where fixed v1 copies
    go (default: next to the failures CSV). The other arguments are ``fvlm segment``'s flags.
    ``ValueError`` / ``FileNotFoundError`` for unusable arguments or inputs, before anything is run.
    """
    if bool(data) == bool(pairs):
        raise ValueError("give exactly one of --data (CT-RATE root, with --split) or --pairs (volume,image,label CSV)")
    if data and not split:
        raise ValueError("--data needs --split (train or valid)")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if verify not in ("header", "full"):
        raise ValueError(f"--verify must be header or full, got {verify!r}")
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    table = load_anatomy_table(anatomy_table)
    roi = roi_subset(table)
    runner = find_totalsegmentator(totalseg_cmd or None, roi, fast=fast, device=device, task=task, timeout=timeout)
    rejected: list[RejectedRow] = []
    if data:
        assert split is not None
        jobs = ctrate_segment_jobs(data, split, version=version, reconstructions=parse_reconstructions(reconstructions),
                                   exclude_no_chest=not include_no_chest)
        default_failures = Path(data) / "dataset" / f"{split}_mask" / "segment_failures.csv"
    else:
        jobs = pairs_segment_jobs(pairs, default_split=split or "valid", rejected=rejected)  # type: ignore[arg-type]
        default_failures = Path(pairs).with_name(Path(pairs).stem + "_segment_failures.csv")  # type: ignore[arg-type]
    if not jobs and not rejected:
        raise FileNotFoundError(f"no volumes found in {data or pairs}")
    log.info("anatomy table %r: roi_subset of %d classes: %s", table.name, len(roi), " ".join(roi))
    summary = run_segment(jobs, runner, workers=workers, shard=shard, limit=limit, verify=verify,
                          tmp_dir=str(tmp_dir) if tmp_dir else str(default_tmp_dir(default_failures)))
    summary.roi = roi
    for r in rejected:  # rows refused for their names: nothing was run or written for them
        log.error("%s line %d refused: %s", r.source, r.line, r.error)
        summary.results.append(SegmentResult(r.split, r.volume, "failed", error=r.error))
    path = Path(failures) if failures else default_failures
    if shard[1] > 1 and not failures:
        path = path.with_name(f"{path.stem}.shard{shard[0]}of{shard[1]}.csv")
    if summary.failed or path.exists():
        write_failures(path, [(r.split, r.volume, r.error) for r in summary.failed])
        summary.failures_csv = path
        if summary.failed:
            log.error("%d volume(s) failed; listed in %s", len(summary.failed), path)
    return summary
