"""Rad-ChestCT (Draelos et al., MedIA 2021) as an external test set: volumes, labels, CT-RATE label mappings.

**Volumes.** Each ``{NoteAcc_DEID}.npz`` (e.g. ``tst34780.npz``) holds one array under the key ``ct``: int16 HU
clipped to [-1000, 1000], resampled to 0.8 mm isotropic, axes ``(z, y, x)``, no affine. Orientation
assumption (stated, then checked): index ``z`` grows towards the patient's **inferior** (slice 0 is the most
superior), ``y`` towards **posterior**, ``x`` towards the patient's **left** ("IPL" = the directions of increasing
index). Evidence: the release's preprocessing stacks DICOM slices in descending position along the slice
normal (superior first) from axial scans with ImageOrientationPatient [1, 0, 0, 0, 1, 0] and then transposes
to (slices, rows, columns); the lung-extrema CSV of the release names its columns ``sup_axis0min``,
``ant_axis1min``, ``rig_axis2min``. As a SimpleITK/LPS geometry: spacing (0.8, 0.8, 0.8) mm, direction
diag(1, 1, -1), origin (0, 0, 0) at voxel (0, 0, 0) (the true patient position is not in the release).

Because a wrong z direction would make TotalSegmentator see an upside-down patient, every volume is checked
against anatomy before it is written (:func:`fvlm.data.orientation.superior_end_from_hu`: the trachea lies above the
lungs' centre; without a visible trachea, the soft tissue of the lower chest and upper abdomen lies below it) and
flipped with a logged warning when the check confidently disagrees; label maps, when given, are checked again
from their classes (:func:`~fvlm.data.orientation.superior_end_from_labels`: lungs above the abdominal organs,
upper lobes above lower lobes).

**Labels** (:mod:`fvlm.data.radchestct_labels`): the 84 abnormality columns of the release and the three
mappings to CT-RATE's labels.

**Conversion** (:func:`convert`, ``fvlm radchestct``): NIfTI images + a ``volume,image,label,split`` pairs CSV
for ``fvlm segment --pairs`` and ``fvlm preprocess --pairs``, and the mapped labels CSV for ``fvlm metrics``.
"""

from __future__ import annotations

import csv
import io
import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fvlm.data.jobs import JobError, run_jobs
from fvlm.data.labelmap import align_label
from fvlm.data.orientation import OrientationCheck, superior_end_from_hu, superior_end_from_labels
from fvlm.data.radchestct_labels import MAPPINGS, map_labels, read_labels, write_ctrate_labels
from fvlm.data.store import Geometry
from fvlm.data.volume import SourceVolume, read_header, read_nifti, write_nifti
from fvlm.io import atomic_path, atomic_write_text
from fvlm.paths import component_problem, safe_component

log = logging.getLogger(__name__)

NPZ_KEY = "ct"
SPACING_MM = 0.8
HU_RANGE = (-1000, 1000)
#: index axes (x, y, z) -> LPS directions: x to Left, y to Posterior, z to Inferior (slice 0 most superior)
DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
#: split of a volume from its NoteAcc_DEID prefix
SPLIT_PREFIXES = {"trn": "imgtrain", "val": "imgvalid", "tst": "imgtest"}

# ----------------------------------------------------------------------------------------------- volumes
def split_of(volume: str) -> str:
    """``tst34780`` -> ``imgtest`` (``trn`` imgtrain, ``val`` imgvalid); ``""`` for another prefix."""
    return SPLIT_PREFIXES.get(volume[:3].lower(), "")


def load_npz(path: str | Path) -> np.ndarray:
    """The ``ct`` array of a Rad-ChestCT .npz: int16 ``(z, y, x)`` HU. ``ValueError`` names what is wrong."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if NPZ_KEY not in z.files:
                raise ValueError(f"{path}: no {NPZ_KEY!r} array (keys {z.files})")
            ct = z[NPZ_KEY]
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: unreadable .npz ({type(e).__name__}: {e})") from None
    if ct.ndim != 3 or min(ct.shape) < 2:
        raise ValueError(f"{path}: expected a 3D (z, y, x) volume, got shape {ct.shape}")
    if ct.dtype.kind not in "iu":
        if not np.all(np.isfinite(ct)):
            raise ValueError(f"{path}: non-finite values in {ct.dtype} volume")
        ct = np.rint(ct)
    lo, hi = float(ct.min()), float(ct.max())
    if lo < HU_RANGE[0] - 24 or hi > HU_RANGE[1] + 24 or hi <= lo:
        log.warning("%s: values %g..%g outside the release's HU clip %s: not a Rad-ChestCT volume?", path, lo, hi,
                    HU_RANGE)
    return np.clip(ct, -32768, 32767).astype(np.int16, copy=False)


def geometry(flip_z: bool = False) -> Geometry:
    """The assumed LPS :class:`~fvlm.data.store.Geometry` (module doc); ``flip_z`` = z grows to superior."""
    d = list(DIRECTION)
    if flip_z:
        d[8] = -d[8]
    return Geometry((SPACING_MM,) * 3, (0.0, 0.0, 0.0), tuple(d))


def orient(ct: np.ndarray, mode: str = "check", volume: str = "") -> tuple[np.ndarray, bool, OrientationCheck | None]:
    """Apply the orientation policy to a release array ``(z, y, x)``.

    ``mode``: ``"check"`` (default) keeps the documented convention unless :func:`superior_end_from_hu`
    confidently finds the superior end at the end of axis 0, then flips axis 0 with a warning;
    ``"documented"`` trusts the convention; ``"flip"`` always flips axis 0.
    Returns (array with slice 0 superior, flipped, check or None).
    """
    if mode == "documented":
        return ct, False, None
    if mode == "flip":
        return ct[::-1], True, None
    if mode != "check":
        raise ValueError(f"orientation mode must be check, documented or flip, got {mode!r}")
    chk = superior_end_from_hu(ct, spacing_mm=SPACING_MM)
    if chk.superior == "end":
        log.warning("%s: anatomy says slice 0 is INFERIOR (%s), against the Rad-ChestCT convention: flipping axis 0",
                    volume or "volume", chk.evidence)
        return ct[::-1], True, chk
    if chk.superior is None:
        log.debug("%s: orientation check inconclusive (%s): keeping the documented convention", volume, chk.evidence)
    return ct, False, chk


# ----------------------------------------------------------------------------------------------- conversion
@dataclass
class ConvertResult:
    """One volume's conversion (a row of ``conversion.csv``)."""

    volume: str
    status: str  # ok | skipped | failed
    error: str = ""
    flipped: bool = False
    orientation: str = ""  # superior end from HU: start | end | unknown | not checked
    shape: tuple[int, ...] = ()


MANIFEST_FIELDS = ("volume", "split", "status", "shape", "flipped", "orientation", "error")


@dataclass
class Conversion:
    """What :func:`convert` did: every volume's result (in the order of ``conversion.csv``) and the files written."""

    volumes: list[ConvertResult]
    out: Path
    mapping: str
    pairs_csv: Path
    labels_csv: Path
    seconds: float = 0.0

    @property
    def failed(self) -> list[ConvertResult]:
        """The volumes that failed (listed in ``OUT/failures.csv``)."""
        return [r for r in self.volumes if r.status == "failed"]

    @property
    def ok(self) -> bool:
        """Every volume converted (now or before)."""
        return not self.failed


def verify_mask(image: Path, mask: Path) -> OrientationCheck:
    """``ValueError`` unless the label map ``mask`` lies on the grid of the converted ``image`` and shows the
    patient upright (:func:`superior_end_from_labels`; the image's slice 0 is superior)."""
    h = read_header(image)
    lab = align_label(SourceVolume(np.empty(h.shape_xyz[:3][::-1], dtype=np.uint8), h.geometry), read_nifti(mask),
                      label_name=f"label map {mask}", image_name=f"image {image}")
    chk = superior_end_from_labels(lab.array)
    if chk.superior == "end":
        raise ValueError(f"label map {mask} shows the patient upside down (superior at the last slice: "
                         f"{chk.evidence}); convert with --orientation flip and segment again")
    return chk


def convert_volume(npz: Path, image_out: Path, orientation: str = "check") -> ConvertResult:
    """One .npz -> NIfTI at ``image_out`` (atomic). Never raises: a problem becomes a failed result."""
    name = npz.stem
    try:
        ct = load_npz(npz)
        arr, flipped, chk = orient(ct, orientation, name)
        with atomic_path(image_out, suffix=".nii.gz") as tmp:
            write_nifti(tmp, arr, geometry())
        return ConvertResult(name, "ok", flipped=flipped,
                             orientation="not checked" if chk is None else (chk.superior or "unknown"),
                             shape=tuple(int(s) for s in arr.shape))
    except Exception as e:  # a batch job records every per-volume failure and goes on
        if not isinstance(e, (ValueError, FileNotFoundError, OSError)):
            log.warning("%s: unexpected %s", name, type(e).__name__, exc_info=True)
        return ConvertResult(name, "failed", error=" ".join(str(e).split()))


def _read_manifest(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {r["volume"]: r for r in csv.DictReader(f)}


def convert(npz_dir: str | Path, labels_csv: str | Path, out: str | Path, mapping: str = "standard",
            masks: str | Path | None = None, split: str = "", orientation: str = "check", limit: int = 0,
            workers: int = 1) -> Conversion:
    """Rad-ChestCT -> files for ``fvlm segment --pairs`` / ``fvlm preprocess --pairs`` / ``fvlm metrics``.

    Writes (``out`` = OUT)::

        OUT/images/{id}.nii.gz        int16 HU, LPS geometry of :func:`geometry` (after the orientation check)
        OUT/pairs.csv                 volume,image,label,split (label = MASKS/{id}.nii.gz, default OUT/masks/)
        OUT/labels_{mapping}.csv      VolumeName + the mapping's CT-RATE labels, volumes converted OK only
        OUT/conversion.csv            volume, split, status, shape, flipped, orientation, error
        OUT/failures.csv              volume, error (only when some failed)

    Volumes are the .npz files of ``npz_dir`` that have a label row (the others are reported). A rerun
    skips images that exist. ``split`` names the split of every pair (default: from the id prefix: trn ->
    imgtrain, val -> imgvalid, tst -> imgtest). ``workers`` processes convert (one job pool,
    :func:`fvlm.data.jobs.run_jobs`; 1 = in this process). Every failed volume is logged and listed in
    ``failures.csv`` at the end; the others are still written.
    """
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    npz_dir, out = Path(npz_dir), Path(out)
    if split:  # becomes a folder of fvlm preprocess --out
        safe_component(split, "--split")
    if not npz_dir.is_dir():
        raise FileNotFoundError(f"--npz-dir {npz_dir}: no such directory")
    labels = read_labels(labels_csv)
    mapped = map_labels(labels, mapping)  # fail on a bad mapping before any work
    files = {p.stem: p for p in sorted(npz_dir.glob("*.npz")) if component_problem(p.stem) is None}
    if not files:
        raise FileNotFoundError(f"no .npz volumes in {npz_dir}")
    without_labels = sorted(set(files) - set(labels))
    if without_labels:
        log.warning("%d .npz volume(s) have no row in %s and are skipped: %s", len(without_labels), labels_csv,
                    without_labels[:5])
    not_on_disk = len(set(labels) - set(files))
    if not_on_disk:
        log.info("%d labelled volume(s) of %s are not in %s", not_on_disk, labels_csv, npz_dir)
    names = [n for n in files if n in labels]
    if limit > 0:
        names = names[:limit]
    if not names:
        raise FileNotFoundError(f"no .npz volume of {npz_dir} has a row in {labels_csv}")
    mask_dir = Path(masks) if masks else out / "masks"
    images = out / "images"
    previous = _read_manifest(out / "conversion.csv")
    results: dict[str, ConvertResult] = {}
    todo = []
    for n in names:
        img = images / f"{n}.nii.gz"
        prev = previous.get(n)
        if img.exists() and prev is not None and prev.get("status") in ("ok", "skipped"):
            results[n] = ConvertResult(n, "skipped", flipped=prev.get("flipped") == "True",
                                       orientation=prev.get("orientation", ""),
                                       shape=tuple(int(s) for s in prev.get("shape", "").split("x") if s))
        else:
            todo.append(n)
    log.info("radchestct: %d volumes, %d converted already, %d to do; mapping %r (%d CT-RATE labels)", len(names),
             len(names) - len(todo), len(todo), mapping, len(MAPPINGS[mapping]))
    t0 = time.perf_counter()
    args = [(files[n], images / f"{n}.nii.gz", orientation) for n in todo]
    with tqdm(total=len(todo), desc="radchestct", unit="vol", disable=None) as bar:
        if workers <= 1 or len(todo) <= 1:
            for a in args:
                r = convert_volume(*a)
                results[r.volume] = r
                bar.update()
        else:
            # a worker that dies (out of memory) fails only the volume it held
            for k, r in run_jobs(convert_volume, args, workers, context="forkserver"):
                if isinstance(r, JobError):
                    r = ConvertResult(todo[k], "failed", error=r.error)
                results[r.volume] = r
                bar.update()
    ordered = [results[n] for n in names]
    n_masks = 0
    for r in ordered:  # label maps made since (fvlm segment --pairs): same grid, patient upright
        mask = mask_dir / f"{r.volume}.nii.gz"
        if r.status != "failed" and mask.exists():
            n_masks += 1
            try:
                verify_mask(images / f"{r.volume}.nii.gz", mask)
            except (ValueError, OSError) as e:
                r.status, r.error = "failed", " ".join(str(e).split())
    if n_masks:
        log.info("checked %d label map(s) in %s against their images", n_masks, mask_dir)
    ok = [r.volume for r in ordered if r.status != "failed"]
    failed = [r for r in ordered if r.status == "failed"]

    def split_name(n: str) -> str:
        return split or split_of(n) or "radchestct"

    # pairs CSV: paths relative to OUT where possible (preprocess resolves them against the CSV's folder)
    def rel(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(out.resolve()))
        except ValueError:
            return str(p.resolve())

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["volume", "image", "label", "split"])
    for n in ok:
        w.writerow([n, rel(images / f"{n}.nii.gz"), rel(mask_dir / f"{n}.nii.gz"), split_name(n)])
    atomic_write_text(out / "pairs.csv", buf.getvalue())
    write_ctrate_labels(out / f"labels_{mapping}.csv", mapped, mapping, volumes=ok)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_FIELDS)
    for r in ordered:
        w.writerow([r.volume, split_name(r.volume), r.status, "x".join(map(str, r.shape)),
                    r.flipped, r.orientation, r.error])
    atomic_write_text(out / "conversion.csv", buf.getvalue())
    if failed:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["volume", "error"])
        for r in failed:
            w.writerow([r.volume, r.error])
            log.error("%s failed: %s", r.volume, r.error)
        atomic_write_text(out / "failures.csv", buf.getvalue())
    elif (out / "failures.csv").exists():
        (out / "failures.csv").unlink()
    flipped = [r.volume for r in ordered if r.flipped]
    log.info("radchestct: %d converted, %d skipped (done before), %d failed in %.1f s; %d flipped%s; next: fvlm "
             "segment --pairs %s, then fvlm preprocess --pairs %s", sum(r.status == "ok" for r in ordered),
             sum(r.status == "skipped" for r in ordered), len(failed), time.perf_counter() - t0, len(flipped),
             f" ({', '.join(flipped[:5])})" if flipped else "", out / "pairs.csv", out / "pairs.csv")
    return Conversion(ordered, out, mapping, out / "pairs.csv", out / f"labels_{mapping}.csv",
                      seconds=time.perf_counter() - t0)

