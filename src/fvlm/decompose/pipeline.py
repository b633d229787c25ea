"""Reports CSV -> ``desc_info.json`` / ``conc_info.json``: reading, deduplication, backends, outputs, and
:func:`decompose_files` (the job of ``fvlm decompose``)."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.decompose.base import Decomposition
from fvlm.decompose.evaluate import evaluate_decomposition, format_evaluation
from fvlm.decompose.lexicon import Lexicon, load_lexicon
from fvlm.decompose.llm import PROMPT_VERSION, LLMConfig, LLMDecomposer
from fvlm.decompose.rules import RulesDecomposer
from fvlm.decompose.sentences import is_empty_section
from fvlm.io import atomic_write_text
from fvlm.text import scan_id

log = logging.getLogger(__name__)

REPORT_COLUMNS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")
REQUIRED_COLUMNS = ("VolumeName", "Findings_EN", "Impressions_EN")
SUMMARY_FILE = "decompose_summary.json"
EVALUATION_FILE = "evaluation.json"


@dataclass
class DecomposeSummary:
    """What a decomposition run did (written as ``decompose_summary.json`` next to the outputs)."""

    backend: str
    table: str
    lexicon: str
    n_rows: int = 0
    n_scans: int = 0
    n_duplicate_rows: int = 0  # further reconstructions of a scan with the same report (dropped)
    n_conflicting_rows: int = 0  # further rows of a scan with a DIFFERENT report (dropped; the first one is used)
    n_empty_reports: int = 0  # no findings and no impression
    per_anatomy: dict[str, dict[str, int]] = field(default_factory=dict)  # anatomy -> {"desc": n, "conc": n}
    llm: dict[str, object] = field(default_factory=dict)  # prompt version, model, counts (ok, cached, fallbacks)
    failures: list[dict[str, str]] = field(default_factory=list)  # {"volume": ..., "error": ...}
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def read_reports(paths: str | Path | list[str | Path]) -> pd.DataFrame:
    """Read one or several CT-RATE-format reports CSVs (a list, or one string with comma-separated paths).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing or lacks columns.
    """
    if isinstance(paths, (str, Path)):
        paths = [p.strip() for p in str(paths).split(",") if p.strip()]
    if not paths:
        raise ValueError("no reports CSV given")
    frames = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"reports CSV {p} not found")
        try:
            df = pd.read_csv(p, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            raise ValueError(f"reports CSV {p}: empty file ({p.stat().st_size} bytes): expected a header row with "
                             f"{list(REPORT_COLUMNS)}") from None
        except (UnicodeDecodeError, pd.errors.ParserError, ValueError) as e:
            raise ValueError(f"reports CSV {p}: not a readable CSV text file ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"reports CSV {p}: missing columns {missing} (has {list(df.columns)}; expected the "
                             f"CT-RATE layout {list(REPORT_COLUMNS)})")
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _section(value: object) -> str:
    return "" if is_empty_section(value) else " ".join(str(value).split())


def decompose_reports(
    reports: pd.DataFrame,
    table: AnatomyTable | str = "released",
    backend: str = "rules",
    *,
    lexicon: Lexicon | str | Path | None = None,
    llm: LLMConfig | None = None,
    progress: bool = True,
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]], DecomposeSummary]:
    """Split reports into anatomy-wise findings (``desc``) and abnormal impression (``conc``) texts.

    Args:
        reports: CT-RATE-format reports (``VolumeName``, ``Findings_EN``, ``Impressions_EN``; see
            :func:`read_reports`). Rows of one scan are deduplicated (the first is used).
        table: anatomy table or its name/path.
        backend: ``"rules"`` (offline) or ``"llm"`` (needs ``llm``; falls back to the rules per report on
            invalid answers or endpoint errors).
        lexicon: the rules' lexicon (default: the shipped one) or a path to one.
        llm: endpoint configuration for the LLM backend.
    Returns:
        ``(desc, conc, summary)``; ``desc``/``conc`` are ``{scan_id: {anatomy: text}}`` in the authors' format
        (every scan appears in both, possibly with ``{}``), anatomies in table order.
    """
    t0 = time.perf_counter()
    if not isinstance(table, AnatomyTable):
        table = load_anatomy_table(table)
    if not isinstance(lexicon, Lexicon):
        lexicon = load_lexicon(lexicon)
    if backend not in ("rules", "llm"):
        raise ValueError(f"unknown decompose backend {backend!r} (rules, llm)")
    missing = [c for c in REQUIRED_COLUMNS if c not in reports.columns]
    if missing:
        raise ValueError(f"reports: missing columns {missing}")
    rules = RulesDecomposer(table, lexicon)
    summary = DecomposeSummary(backend=backend, table=table.name, lexicon=f"{lexicon.name}/{lexicon.version}")

    # one report per scan (all reconstructions of a scan share the report in CT-RATE)
    scans: dict[str, tuple[str, str, str]] = {}
    for volume, findings, impression in zip(reports["VolumeName"], reports["Findings_EN"],
                                            reports["Impressions_EN"], strict=True):
        summary.n_rows += 1
        try:
            scan = scan_id(str(volume))
        except ValueError as e:
            summary.failures.append({"volume": str(volume), "error": str(e)})
            continue
        f, i = _section(findings), _section(impression)
        if scan in scans:
            if scans[scan][1:] == (f, i) or not (f or i):
                summary.n_duplicate_rows += 1  # the same report, or an empty row: never replaces a report
            elif not any(scans[scan][1:]):
                summary.n_duplicate_rows += 1  # an empty first row does not win over a non-empty duplicate
                scans[scan] = (str(volume), f, i)
            else:
                summary.n_conflicting_rows += 1
                log.warning("decompose: %s has a report that differs from the one of %s (same scan %s); using the "
                            "first", volume, scans[scan][0], scan)
            continue
        scans[scan] = (str(volume), f, i)
    summary.n_scans = len(scans)
    summary.n_empty_reports = sum(1 for _, f, i in scans.values() if not f and not i)

    results: dict[str, Decomposition] = {}
    items = list(scans.items())
    if backend == "rules":
        for scan, (volume, f, i) in tqdm(items, desc="decompose (rules)", unit="scan", disable=not progress):
            try:
                results[scan] = rules.decompose(f, i)
            except Exception as e:  # a batch job: record the report, keep going, exit non-zero at the end
                log.debug("decompose failed for %s", volume, exc_info=True)
                summary.failures.append({"volume": volume, "error": f"{type(e).__name__}: {e}"})
    else:
        if llm is None:
            raise ValueError("backend 'llm' needs an LLMConfig (URL and model)")
        covers: dict[str, list[str]] = {}
        for concept, anatomies in rules.concept_anatomies.items():
            for a in anatomies:
                covers.setdefault(a, []).append(concept)
        model = LLMDecomposer(table, llm, covers)
        fallbacks = {"invalid": 0, "error": 0}
        examples: list[str] = []
        per_report: list[dict[str, str]] = []

        def one(item: tuple[str, tuple[str, str, str]]) -> tuple[str, Decomposition | None, str, str]:
            scan, (volume, f, i) = item
            try:
                got, status, message = model.decompose(f, i)
                if got is None:
                    got = rules.decompose(f, i)
            except Exception as e:  # a batch job: record the report, keep going, exit non-zero at the end
                log.debug("decompose failed for %s", volume, exc_info=True)
                return scan, None, "failed", f"{type(e).__name__}: {e}"
            return scan, got, status, message

        with ThreadPoolExecutor(max_workers=max(1, llm.workers)) as pool:
            for scan, got, status, message in tqdm(pool.map(one, items), total=len(items), desc="decompose (llm)",
                                                   unit="scan", disable=not progress):
                if got is None:
                    summary.failures.append({"volume": scans[scan][0], "error": message})
                    continue
                results[scan] = got
                if status in fallbacks:
                    fallbacks[status] += 1
                    message = llm.redact(message)
                    log.warning("decompose llm: %s (%s): %s (%s); used the rules backend", scan, scans[scan][0],
                                "invalid answer" if status == "invalid" else "endpoint error", message)
                    per_report.append({"scan": scan, "volume": scans[scan][0], "status": status, "message": message})
                    if len(examples) < 5:
                        examples.append(f"{scan}: {status}: {message}")
        summary.llm = {"prompt_version": PROMPT_VERSION, "model": llm.model, "url": llm.redact(llm.endpoint),
                       "cache_dir": str(llm.cache_dir or ""), "timeout": llm.timeout, "max_retries": llm.max_retries,
                       "invalid_retries": llm.invalid_retries, **model.stats,
                       "fallback_invalid": fallbacks["invalid"], "fallback_error": fallbacks["error"],
                       "fallback_examples": examples, "fallbacks": per_report}
        if fallbacks["invalid"] or fallbacks["error"]:
            log.warning("decompose llm: %d of %d reports fell back to the rules backend (%d invalid answers, %d "
                        "endpoint errors)", fallbacks["invalid"] + fallbacks["error"], len(items),
                        fallbacks["invalid"], fallbacks["error"])

    desc: dict[str, dict[str, str]] = {}
    conc: dict[str, dict[str, str]] = {}
    per = {a: {"desc": 0, "conc": 0} for a in table.names}
    for scan in scans:
        if scan not in results:
            continue
        d, c = results[scan].desc(), results[scan].conc()
        desc[scan] = {a: d[a] for a in table.names if a in d}
        conc[scan] = {a: c[a] for a in table.names if a in c}
        for a in desc[scan]:
            per[a]["desc"] += 1
        for a in conc[scan]:
            per[a]["conc"] += 1
    summary.per_anatomy = per
    summary.seconds = round(time.perf_counter() - t0, 3)
    return desc, conc, summary


def write_outputs(out_dir: str | Path, desc: dict, conc: dict, summary: DecomposeSummary | None = None) -> None:
    """Write ``desc_info.json``, ``conc_info.json`` (and ``decompose_summary.json``) atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "desc_info.json", json.dumps(desc, ensure_ascii=False, indent=1))
    atomic_write_text(out / "conc_info.json", json.dumps(conc, ensure_ascii=False, indent=1))
    if summary is not None:
        atomic_write_text(out / SUMMARY_FILE, json.dumps(summary.to_dict(), ensure_ascii=False, indent=1))


@dataclass
class DecomposeResult:
    """What ``fvlm decompose`` did: the decomposition summary (None without ``reports``) and the evaluation
    against reference files (None without ``gold``). ``ok``: no row failed, and the LLM, when asked for, was
    used at least once (or its absence was accepted)."""

    ok: bool
    summary: DecomposeSummary | None = None
    evaluation: dict | None = None


def decompose_files(reports: str | None, out: str | Path | None, table: AnatomyTable | str = "released",
                    backend: str = "rules", *,
                    lexicon: str | Path | None = None, llm: LLMConfig | None = None, accept_fallback: bool = False,
                    gold: str | Path | None = None, pred: str | Path | None = None) -> DecomposeResult:
    """Decompose the reports CSV(s) ``reports`` (comma-separated) into ``out`` (desc_info.json, conc_info.json,
    summary) and/or evaluate ``pred`` (default ``out``) against the reference directory ``gold``
    (evaluation.json in ``pred``). ``table``: an anatomy table or its name / JSON path. ``llm``: the endpoint of
    the ``llm`` backend."""
    if not isinstance(table, AnatomyTable):
        table = load_anatomy_table(table)
    if not reports and not gold:
        raise ValueError("fvlm decompose: give --reports (and --out) to decompose, and/or --evaluate GOLD_DIR")
    result = DecomposeResult(ok=True)
    if reports:
        if not out:
            raise ValueError("fvlm decompose: --reports needs --out")
        rows = read_reports(reports)
        desc, conc, summary = decompose_reports(rows, table, backend, lexicon=lexicon or None, llm=llm)
        write_outputs(out, desc, conc, summary)
        result.summary = summary
        n_abn = sum(len(v) for v in conc.values())
        log.info("decompose: %d scans (%d rows, %d duplicate, %d conflicting) -> %s/desc_info.json, conc_info.json "
                 "(%d abnormal anatomy impressions) in %.1f s", summary.n_scans, summary.n_rows,
                 summary.n_duplicate_rows, summary.n_conflicting_rows, out, n_abn, summary.seconds)
        if summary.failures:
            for f in summary.failures:
                log.error("decompose: %s: %s", f["volume"], f["error"])
            log.error("decompose: %d of %d rows failed", len(summary.failures), summary.n_rows)
            result.ok = False
        if llm is not None and summary.n_scans and not (summary.llm.get("ok") or summary.llm.get("cached")):
            (log.warning if accept_fallback else log.error)(
                "decompose: the LLM at %s was NEVER used: all %d reports fell back to the rules backend (%d invalid "
                "answers, %d endpoint errors; see %s)%s", llm.endpoint, summary.n_scans,
                summary.llm.get("fallback_invalid", 0), summary.llm.get("fallback_error", 0),
                Path(out) / SUMMARY_FILE, "; accepted (--llm-accept-fallback)" if accept_fallback else
                "; exit 1 (--llm-accept-fallback accepts rules-only outputs)")
            if not accept_fallback:
                result.ok = False
    if gold:
        pred = pred or out
        if not pred:
            raise ValueError("fvlm decompose --evaluate: give --pred DIR (or --out DIR) with the predicted JSON files")
        result.evaluation = evaluate_decomposition(pred, gold, table)
        atomic_write_text(Path(pred) / EVALUATION_FILE, json.dumps(result.evaluation, indent=1))
        log.info("decompose evaluation of %s against %s:\n%s", pred, gold, format_evaluation(result.evaluation))
    return result
