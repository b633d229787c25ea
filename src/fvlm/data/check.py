"""``fvlm check-data``: inventory a CT-RATE root before hours of preprocessing or segmentation are spent.

What it reports, per split (``train``, ``valid``):

- counts of patients / scans / volumes listed (metadata and label CSVs) and on disk (``dataset/{split}/`` and
  ``dataset/{split}_fixed/``), reconstructions per scan;
- volumes listed but missing on disk, volumes on disk without a metadata / label / report row;
- metadata problems: rows whose values the v1 fix needs (XYSpacing, ZSpacing, ImagePositionPatient,
  ImageOrientationPatient, RescaleSlope, RescaleIntercept) are empty or unparsable; header shape that
  disagrees with Rows / Columns / NumberofSlices;
- v1 / v2 mix: every volume's header is compared with its metadata (cheap: only the first few hundred bytes of
  each .nii.gz are inflated) through :func:`fvlm.data.v1fix.detect_version`; voxel values are read (slow:
  the whole file) only for volumes whose header is inconclusive, up to ``sample`` per split, and then for a
  spread of the others to confirm the header evidence; reading the values also finds truncated files;
- volumes listed in ``metadata/no_chest_{split}.txt`` (non-chest, even head CTs) and whether they are on disk;
- scans without anatomy texts (``anatomy_texts/{desc,conc}_info.json``) and anatomies of the table that no
  text ever names;
- TotalSegmentator label maps (``dataset/{split}_mask/``) present / missing / with a shape other than the volume's.

It is a report: problems never make it fail. Only an unusable root (no such directory, or neither
``dataset/`` nor ``metadata/``) raises ``FileNotFoundError``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fvlm.anatomy import load_anatomy_table
from fvlm.data import ctrate, v1fix
from fvlm.data.check_report import DataCheck, SplitCheck, log_summary
from fvlm.data.check_report import examples as _ex
from fvlm.data.ctrate import FIX_COLUMNS, no_chest_path, read_volume_list
from fvlm.data.volume import HeaderInfo, check_finite, read_header, read_nifti

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- per volume
def _header_version(info: HeaderInfo, meta: ctrate.VolumeMetadata | None) -> tuple[str, str]:
    """("v1" | "v2" | "unknown", reason) from header evidence alone (NaN statistics = no value evidence)."""
    if meta is None:
        return "unknown", "no metadata row"
    try:
        d = v1fix.detect_version(info.geometry, {"p1_above_min": math.nan}, meta)
    except ValueError as e:
        return "unknown", str(e).split(";")[0]
    return d.version, "header"


def _value_version(path: Path, meta: ctrate.VolumeMetadata | None) -> tuple[str, str]:
    """Read the whole volume: ("v1" | "v2" | "conflict" | "unknown" | "unreadable", reason)."""
    try:
        vol = read_nifti(path)
        check_finite(vol.array)
    except (ValueError, OSError) as e:
        return "unreadable", str(e)
    stats = v1fix.value_statistics(vol.array)
    try:
        d = v1fix.detect_version(vol.geometry, stats, meta)
    except ValueError as e:
        kind = "conflict" if "conflicting" in str(e) else "unknown"
        return kind, str(e).split("; pass")[0]
    return d.version, f"header+values (1st percentile {stats['p1_above_min']:g})"


def _spread(items: Sequence[str], k: int) -> list[str]:
    """``k`` items evenly spread over ``items`` (deterministic)."""
    if k <= 0 or not items:
        return []
    if k >= len(items):
        return list(items)
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


def _counts(names: Iterable[str]) -> dict[str, int]:
    """Patients, scans and volumes among CT-RATE volume names (unparsable names count as volumes only)."""
    patients, scans, n = set(), set(), 0
    for name in names:
        n += 1
        try:
            v = ctrate.parse_volume_name(name)
        except ValueError:
            continue
        patients.add(v.patient_id)
        scans.add(v.scan_id)
    return {"patients": len(patients), "scans": len(scans), "volumes": n}


def _read_csv_names(path: Path, what: str) -> tuple[list[str] | None, str]:
    """VolumeName column of a CSV (None when absent) and a problem string ("" when fine)."""
    if not path.exists():
        return None, f"{what} {path} not found"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if "VolumeName" not in (reader.fieldnames or []):
                return None, f"{path}: no VolumeName column"
            return [ctrate.strip_extension(r["VolumeName"]) for r in reader if (r.get("VolumeName") or "").strip()], ""
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{path}: unreadable ({e})"


# ----------------------------------------------------------------------------------------------- the check
def check_split(root: Path, split: str, sample: int = 20, table: Any = None, workers: int = 4,
                texts: tuple[dict | None, dict | None] = (None, None)) -> SplitCheck:
    """Inventory one split of a CT-RATE root (see module doc)."""
    rep: dict[str, Any] = {"problems": []}
    problems: list[str] = rep["problems"]

    # --- listed volumes: metadata + labels + reports
    mpath = ctrate.metadata_path(root, split)
    metadata: dict[str, ctrate.VolumeMetadata] = {}
    md_rep: dict[str, Any] = {"path": str(mpath), "exists": mpath.exists()}
    if mpath.exists():
        duplicates: list[dict[str, Any]] = []
        metadata = ctrate.read_metadata(mpath, duplicates=duplicates)
        md_rep["duplicates"] = duplicates
        conflicting = [d for d in duplicates if d["conflicting"]]
        if conflicting:
            d = conflicting[0]
            problems.append(f"metadata {mpath}: {len(conflicting)} volume(s) listed twice with DIFFERENT values "
                            f"(refused by preprocess), e.g. {d['volume']} on lines {d['lines']} "
                            f"({', '.join(d['columns'])})")
        if len(duplicates) > len(conflicting):
            problems.append(f"metadata {mpath}: {len(duplicates) - len(conflicting)} volume(s) listed twice with "
                            f"identical values (one row is used)")
        empty: dict[str, list[str]] = {c: [] for c in FIX_COLUMNS}
        unparsable: dict[str, list[str]] = {}
        for name, m in metadata.items():
            bad_cols = {p.split(":", 1)[0] for p in m.problems}
            for c in bad_cols:
                unparsable.setdefault(c, []).append(name)
            for c in FIX_COLUMNS:
                if c not in bad_cols and not (m.raw.get(c) or "").strip():
                    empty[c].append(name)
        md_rep.update(rows=len(metadata), empty={c: v for c, v in empty.items() if v}, unparsable=unparsable)
        for c, v in md_rep["empty"].items():
            problems.append(f"metadata: {len(v)} row(s) with empty {c} (v1 volumes among them cannot be fixed)")
        for c, v in unparsable.items():
            problems.append(f"metadata: {len(v)} row(s) with unparsable {c}")
    else:
        problems.append(f"metadata CSV {mpath} not found (v1 volumes cannot be fixed without it)")
    rep["metadata"] = md_rep
    side: dict[str, list[str] | None] = {}
    for key, path in (("labels", ctrate.labels_path(root, split)), ("reports", ctrate.reports_path(root, split))):
        names, problem = _read_csv_names(path, f"{key} CSV")
        side[key] = names
        rep[key] = {"path": str(path), "exists": path.exists(), "rows": len(names) if names is not None else 0}
        if problem:
            problems.append(problem)
    listed = dict.fromkeys(metadata)
    listed.update(dict.fromkeys(side["labels"] or ()))
    listed_names = sorted(listed, key=ctrate.natural_key)
    rep["listed"] = _counts(listed_names)

    # --- on disk
    files = ctrate.find_volumes(root, split)
    fixed_dir = root / "dataset" / f"{split}_fixed"
    per_scan = Counter()
    for n in files:
        try:
            per_scan[ctrate.parse_volume_name(n).scan_id] += 1
        except ValueError:
            pass
    rep["on_disk"] = {**_counts(files),
                      "in_fixed_folder": sum(1 for p in files.values() if fixed_dir in p.parents),
                      "reconstructions_per_scan": {str(k): v for k, v in sorted(Counter(per_scan.values()).items())}}
    missing = [n for n in listed_names if n not in files]
    rep["missing_on_disk"] = missing
    if missing and files:
        problems.append(f"{len(missing)} of {len(listed_names)} listed volumes are not on disk (not downloaded?)")
    elif missing:
        problems.append(f"no volume of the {len(listed_names)} listed is on disk under {root}/dataset/{split}[_fixed]")
    rep["not_in_metadata"] = [n for n in files if n not in metadata]
    if rep["not_in_metadata"]:
        problems.append(f"{len(rep['not_in_metadata'])} volume(s) on disk have no metadata row (v1 ones cannot be "
                        f"fixed; auto-detection has no header evidence)")
    for key in ("labels", "reports"):
        if side[key] is not None:
            have = set(side[key])
            rep[f"not_in_{key}"] = [n for n in files if n not in have]
            if rep[f"not_in_{key}"]:
                problems.append(f"{len(rep[f'not_in_{key}'])} volume(s) on disk have no {key} row in "
                                f"{rep[key]['path']}{_ex(rep[f'not_in_{key}'])}")

    # --- headers: v1/v2 evidence, shape against metadata (cheap, threaded: the work is I/O and zlib)
    names = list(files)
    headers: dict[str, HeaderInfo | str] = {}

    def head(n: str) -> tuple[str, HeaderInfo | str]:
        try:
            return n, read_header(files[n])
        except (ValueError, OSError) as e:
            return n, str(e)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        for n, h in tqdm(ex.map(head, names), total=len(names), desc=f"{split} headers", unit="vol", disable=None):
            headers[n] = h
    versions: dict[str, dict[str, str]] = {}
    shape_mismatch = []
    for n in names:
        h = headers[n]
        if isinstance(h, str):
            versions[n] = {"version": "unreadable", "reason": h, "folder": _folder(files[n], fixed_dir)}
            continue
        m = metadata.get(n)
        v, reason = _header_version(h, m)
        versions[n] = {"version": v, "reason": reason, "folder": _folder(files[n], fixed_dir)}
        if m is not None and m.rows and m.columns and m.slices and len(h.shape_xyz) >= 3:
            expected = (m.columns, m.rows, m.slices)
            if tuple(h.shape_xyz[:3]) != expected:
                shape_mismatch.append({"volume": n, "header_xyz": list(h.shape_xyz[:3]),
                                       "metadata_xyz": list(expected)})
    rep["shape_mismatch"] = shape_mismatch
    if shape_mismatch:
        problems.append(f"{len(shape_mismatch)} volume(s) whose header shape differs from the metadata's "
                        f"Columns x Rows x NumberofSlices (wrong or partial file?)")

    # --- values only where needed (inconclusive headers first), then a spread of the rest to confirm
    inconclusive = [n for n in names if versions[n]["version"] == "unknown"]
    conclusive = [n for n in names if versions[n]["version"] in ("v1", "v2")]
    to_read = inconclusive[:sample]
    to_read += _spread(conclusive, max(0, sample - len(to_read)))
    t0 = time.perf_counter()
    for n in tqdm(to_read, desc=f"{split} values", unit="vol", disable=None):
        before = versions[n]["version"]
        v, reason = _value_version(files[n], metadata.get(n))
        if before in ("v1", "v2") and v in ("v1", "v2") and v != before:
            v, reason = "conflict", f"header says {before}, values say {v}"
        versions[n].update(version=v, reason=reason, values_read="yes")
    rep["values_read"] = {"volumes": len(to_read), "seconds": round(time.perf_counter() - t0, 2),
                          "inconclusive_headers": len(inconclusive),
                          "inconclusive_left": max(0, len(inconclusive) - sample)}
    counts = Counter(v["version"] for v in versions.values())
    by_folder: dict[str, dict[str, int]] = {}
    for v in versions.values():
        by_folder.setdefault(v["folder"], Counter())[v["version"]] += 1
    rep["versions"] = {
        "counts": {k: counts.get(k, 0) for k in ("v1", "v2", "unknown", "conflict", "unreadable")},
        "mixed": counts.get("v1", 0) > 0 and counts.get("v2", 0) > 0,
        "by_folder": {k: dict(v) for k, v in by_folder.items()},
        "volumes": {n: versions[n] for n in names if versions[n]["version"] != _expected_version(versions[n])
                    or "values_read" in versions[n]},
    }
    c = rep["versions"]["counts"]
    if rep["versions"]["mixed"]:
        problems.append(f"v1/v2 mix: {c['v1']} v1 (raw, need the fix) and {c['v2']} v2 (HU) volumes; fvlm preprocess "
                        f"detects the version per volume (never rescales twice); check --version auto is used")
    if c["conflict"]:
        problems.append(f"{c['conflict']} volume(s) with conflicting header/value evidence: preprocess will fail them "
                        f"unless --version is forced")
    if c["unreadable"]:
        problems.append(f"{c['unreadable']} unreadable volume file(s) (corrupt or truncated download)")
    if rep["values_read"]["inconclusive_left"]:
        problems.append(f"{rep['values_read']['inconclusive_left']} volume(s) with inconclusive headers not value-"
                        f"checked (raise --sample); preprocess decides them from their values")

    # --- non-chest list
    ncp = no_chest_path(root, split)
    nc: dict[str, Any] = {"path": str(ncp), "exists": ncp.exists(), "listed": 0, "on_disk": []}
    if ncp.exists():
        listed_nc = read_volume_list(ncp)
        nc.update(listed=len(listed_nc), on_disk=[n for n in listed_nc if n in files])
        if nc["on_disk"]:
            problems.append(f"{len(nc['on_disk'])} non-chest volume(s) from {ncp.name} are on disk: exclude them "
                            f"(fvlm segment --exclude-no-chest) or expect failures/noise")
    rep["no_chest"] = nc

    # --- anatomy texts
    desc, conc = texts
    scans = sorted({ctrate.parse_volume_name(n).scan_id for n in files if _parsable(n)}, key=ctrate.natural_key)
    at: dict[str, Any] = {"desc": desc is not None, "conc": conc is not None, "scans_on_disk": len(scans)}
    if desc is not None or conc is not None:
        have = set(desc or {}) | set(conc or {})
        at["scans_without_texts"] = [s for s in scans if s not in have]
        keys = Counter(k for d in (desc or {}, conc or {}) for s in scans if s in d for k in (d[s] or {}))
        at["anatomy_keys"] = dict(sorted(keys.items()))
        if table is not None:
            at["table"] = table.name
            at["table_anatomies_without_text"] = [a for a in table.names if keys.get(a, 0) == 0]
            if scans and at["table_anatomies_without_text"]:
                problems.append(f"anatomy texts never name {at['table_anatomies_without_text']} of table "
                                f"{table.name!r}: those anatomies would only get the normal template "
                                f"(run fvlm decompose with this table)")
        if at["scans_without_texts"]:
            problems.append(f"{len(at['scans_without_texts'])} of {len(scans)} scans on disk have no anatomy texts in "
                            f"{ctrate.anatomy_texts_dir(root)}/desc_info.json{_ex(at['scans_without_texts'])}")
    elif scans:
        problems.append(f"no anatomy texts under {ctrate.anatomy_texts_dir(root)} (fvlm decompose can make them)")
    rep["anatomy_texts"] = at

    # --- TotalSegmentator label maps (header only: shape against the volume's)
    present, absent, mismatched = [], [], []
    for n in names:
        mp = ctrate.mask_path(root, n)
        if not mp.exists():
            absent.append(n)
            continue
        present.append(n)
        h = headers[n]
        try:
            mh = read_header(mp)
        except (ValueError, OSError) as e:
            mismatched.append({"volume": n, "problem": str(e)})
            continue
        if not isinstance(h, str) and tuple(mh.shape_xyz[:3]) != tuple(h.shape_xyz[:3]):
            mismatched.append({"volume": n, "problem": f"label map shape {list(mh.shape_xyz)} != volume "
                                                       f"{list(h.shape_xyz)}"})
    rep["masks"] = {"dir": str(root / "dataset" / f"{split}_mask"), "present": len(present), "missing": absent,
                    "mismatched": mismatched}
    if names and absent:
        problems.append(f"{len(absent)} of {len(names)} volumes on disk have no TotalSegmentator label map "
                        f"(fvlm segment --data {root} --split {split})")
    if mismatched:
        problems.append(f"{len(mismatched)} label map(s) unreadable or of another shape than their volume")
    return SplitCheck(**rep)


def _parsable(name: str) -> bool:
    try:
        ctrate.parse_volume_name(name)
        return True
    except ValueError:
        return False


def _folder(path: Path, fixed_dir: Path) -> str:
    return "fixed" if fixed_dir in path.parents else "plain"


def _expected_version(v: Mapping[str, str]) -> str:
    """What the folder suggests (a ``_fixed`` folder holds v2); used to keep the JSON's per-volume list short."""
    return "v2" if v["folder"] == "fixed" else "v1"


def _read_texts(root: Path) -> tuple[dict | None, dict | None]:
    out: list[dict | None] = []
    for name in ("desc_info.json", "conc_info.json"):
        p = ctrate.anatomy_texts_dir(root) / name
        if not p.exists():
            out.append(None)
            continue
        try:
            with open(p, encoding="utf-8") as f:
                d = json.load(f)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            out.append(d)
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable (%s); treated as absent", p, e)
            out.append(None)
    return out[0], out[1]


def check_data(root: str | Path, splits: Sequence[str] | None = None, sample: int = 20,
               anatomy_table: str | None = "released", workers: int = 4) -> DataCheck:
    """Inventory a CT-RATE root (see module doc). Returns the report (``to_json()``: the ``--json`` file); logs a
    readable summary.

    Args:
        root: CT-RATE-format root (``dataset/``, ``metadata/``, ...).
        splits: splits to check (default: those with a volume folder or a metadata CSV).
        sample: per split, at most this many volumes whose voxel values are read (0 = headers only).
        anatomy_table: table whose anatomies the anatomy-text check looks for (None = skip that check).
        workers: threads reading headers.
    Raises:
        FileNotFoundError: the root does not exist or has neither ``dataset/`` nor ``metadata/``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    if not (root / "dataset").is_dir() and not (root / "metadata").is_dir():
        raise FileNotFoundError(f"{root} is not a CT-RATE root: neither dataset/ nor metadata/ in it")
    if sample < 0:
        raise ValueError(f"--sample must be >= 0, got {sample}")
    if splits is None:
        splits = [s for s in ctrate.SPLITS if (root / "dataset" / s).is_dir()
                  or (root / "dataset" / f"{s}_fixed").is_dir() or ctrate.metadata_path(root, s).exists()]
    table = load_anatomy_table(anatomy_table) if anatomy_table else None
    texts = _read_texts(root)
    report = DataCheck(str(root.resolve()), time.strftime("%Y-%m-%dT%H:%M:%S"), sample)
    for split in splits:
        report.splits[split] = check_split(root, split, sample=sample, table=table, workers=workers, texts=texts)
    report.problems = sum(len(r.problems) for r in report.splits.values())
    log_summary(report)
    return report
