"""Quality of a decomposition against reference anatomy texts (``desc_info.json`` + ``conc_info.json``).

Two measures, on the scans of the reference:

- **normal/abnormal agreement** per scan and anatomy: an anatomy is abnormal iff it has a ``conc`` entry
  (the released convention). Accuracy over all (scan, anatomy) pairs and per anatomy, with the confusion
  counts, sensitivity and specificity (abnormal = positive).
- **sentence assignment** precision/recall: per scan and anatomy, the set of predicted sentences versus the
  reference set (sentences split by :func:`split_sentences` and compared by :func:`normalise_sentence`),
  micro-averaged over all scans and anatomies; separately for ``desc`` and ``conc``, and per anatomy.

A scan of the reference missing from the prediction counts as predicted empty (all normal, no sentences).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fvlm.anatomy import AnatomyTable
from fvlm.decompose.sentences import normalise_sentence, split_sentences

log = logging.getLogger(__name__)

FILES = ("desc_info.json", "conc_info.json")


def load_texts(directory: str | Path, table: AnatomyTable, what: str) -> tuple[dict, dict]:
    """Read and check ``desc_info.json`` / ``conc_info.json`` of ``directory``; raises ``ValueError`` /
    ``FileNotFoundError`` naming the file and the problem when they are unusable."""
    d = Path(directory)
    out = []
    for name in FILES:
        p = d / name
        if not p.is_file():
            raise FileNotFoundError(f"{what}: {p} not found (expected desc_info.json and conc_info.json)")
        try:
            with open(p) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what}: {p} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{what}: {p}: expected {{scan_id: {{anatomy: text}}}}, got {type(data).__name__}")
        for scan, entry in data.items():
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ValueError(f"{what}: {p}: scan {scan!r}: expected {{anatomy: text}}, got {entry!r:.100}")
            unknown = set(entry) - set(table.names)
            if unknown:
                raise ValueError(f"{what}: {p}: scan {scan!r} has anatomies {sorted(unknown)} that are not in "
                                 f"anatomy table {table.name!r} {list(table.names)}")
        out.append(data)
    return out[0], out[1]


def _sentences(text: str | None) -> set[str]:
    return {normalise_sentence(s) for s in split_sentences(text or "")} - {""}


def _prf(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def evaluate_decomposition(pred_dir: str | Path, gold_dir: str | Path, table: AnatomyTable) -> dict:
    """Compare predicted anatomy texts with reference ones (see the module docstring).

    Returns a JSON-able dict: ``agreement`` (accuracy, per_anatomy), ``sentences`` (``desc``/``conc``: micro
    precision/recall/f1 + per_anatomy), scan counts. Raises ``ValueError`` if the files are unusable or the
    prediction shares no scan with the reference.
    """
    gold_desc, gold_conc = load_texts(gold_dir, table, "reference")
    pred_desc, pred_conc = load_texts(pred_dir, table, "prediction")
    gold_scans = sorted(set(gold_desc) | set(gold_conc))
    pred_scans = set(pred_desc) | set(pred_conc)
    if not gold_scans:
        raise ValueError(f"reference {gold_dir} holds no scans")
    common = [s for s in gold_scans if s in pred_scans]
    if not common:
        raise ValueError(f"prediction {pred_dir} shares no scan with reference {gold_dir} "
                         f"(e.g. reference {gold_scans[:3]}, prediction {sorted(pred_scans)[:3]})")
    missing = [s for s in gold_scans if s not in pred_scans]
    if missing:
        log.warning("evaluate: %d of %d reference scans missing from the prediction (counted as empty), e.g. %s",
                    len(missing), len(gold_scans), missing[:5])

    agree = {a: {"tp": 0, "fp": 0, "fn": 0, "tn": 0} for a in table.names}
    counts = {kind: {a: [0, 0, 0] for a in table.names} for kind in ("desc", "conc")}
    for s in gold_scans:
        for a in table.names:
            g_abn = bool(gold_conc.get(s, {}).get(a, "").strip())
            p_abn = bool(pred_conc.get(s, {}).get(a, "").strip())
            key = ("tp" if p_abn else "fn") if g_abn else ("fp" if p_abn else "tn")
            agree[a][key] += 1
            for kind, gold, pred in (("desc", gold_desc, pred_desc), ("conc", gold_conc, pred_conc)):
                gs, ps = _sentences(gold.get(s, {}).get(a)), _sentences(pred.get(s, {}).get(a))
                c = counts[kind][a]
                c[0] += len(gs & ps)
                c[1] += len(ps - gs)
                c[2] += len(gs - ps)

    per_anatomy = {}
    for a, c in agree.items():
        n = sum(c.values())
        per_anatomy[a] = {
            "accuracy": (c["tp"] + c["tn"]) / n,
            "sensitivity": c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else None,
            "specificity": c["tn"] / (c["tn"] + c["fp"]) if c["tn"] + c["fp"] else None,
            "gold_abnormal": c["tp"] + c["fn"],
            **c,
        }
    correct = sum(c["tp"] + c["tn"] for c in agree.values())
    total = sum(sum(c.values()) for c in agree.values())
    sentences = {}
    for kind, per in counts.items():
        tp, fp, fn = (sum(v[k] for v in per.values()) for k in range(3))
        sentences[kind] = {**_prf(tp, fp, fn), "per_anatomy": {a: _prf(*v) for a, v in per.items()}}
    return {
        "table": table.name,
        "n_scans": len(gold_scans),
        "n_scans_missing": len(missing),
        "n_scans_extra": len(pred_scans - set(gold_scans)),
        "agreement": {"accuracy": correct / total, "n": total, "per_anatomy": per_anatomy},
        "sentences": sentences,
    }


def format_evaluation(result: dict) -> str:
    """A plain-text table of an :func:`evaluate_decomposition` result."""
    def f(x: float | None) -> str:
        return "  -  " if x is None else f"{x:5.3f}"

    rows = [f"{'anatomy':<14} {'agree':>6} {'sens':>6} {'spec':>6} {'abn':>5} "
            f"{'desc P':>7} {'desc R':>7} {'conc P':>7} {'conc R':>7}"]
    ag, se = result["agreement"]["per_anatomy"], result["sentences"]
    for a, v in ag.items():
        d, c = se["desc"]["per_anatomy"][a], se["conc"]["per_anatomy"][a]
        rows.append(f"{a:<14} {f(v['accuracy']):>6} {f(v['sensitivity']):>6} {f(v['specificity']):>6} "
                    f"{v['gold_abnormal']:>5} {f(d['precision']):>7} {f(d['recall']):>7} {f(c['precision']):>7} "
                    f"{f(c['recall']):>7}")
    rows.append(f"{'all':<14} {f(result['agreement']['accuracy']):>6} {'':>6} {'':>6} {'':>5} "
                f"{f(se['desc']['precision']):>7} {f(se['desc']['recall']):>7} {f(se['conc']['precision']):>7} "
                f"{f(se['conc']['recall']):>7}")
    rows.append(f"scans: {result['n_scans']} (missing from prediction: {result['n_scans_missing']}, "
                f"extra: {result['n_scans_extra']})")
    return "\n".join(rows)
