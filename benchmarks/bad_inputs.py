"""Bad-input matrix: every fault of tests/test_bad_inputs.py, run through the ``fvlm`` command a user would run.

Per fault: the command, its exit code, the error message, partial files left behind (temporary files or outputs
that must not exist), whether the message names the file and the problem, and whether the good items of a batch
were still processed. A fault is *handled* when all of these hold: non-zero exit, no partial file, the file and
the problem named, the good items done.

``--baseline-src DIR`` runs the same matrix a second time against another source tree (e.g. the landed main,
``/work/main/src``) in a subprocess, so the JSON shows which faults needed a fix.

    python benchmarks/bad_inputs.py                                   # -> benchmarks/results/bad_inputs.json
    python benchmarks/bad_inputs.py --baseline-src /work/main/src     # also the "before" column
    python benchmarks/bad_inputs.py --table                           # the README table of the JSON
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def load_cases():
    spec = importlib.util.spec_from_file_location("bad_input_cases", REPO / "tests" / "test_bad_inputs.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["bad_input_cases"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def run_matrix(work: Path) -> list[dict]:
    m = load_cases()
    res = m.Resources(work / "shared")
    rows = []
    for name in m.CASES:
        t0 = time.perf_counter()
        r = m.run_case(name, work / name, res)
        rows.append({"case": name, **r.to_dict(), "seconds": round(time.perf_counter() - t0, 2)})
        print(f"{'ok  ' if r.ok else 'FAIL'} {name}: exit {r.exit_code}", file=sys.stderr)  # noqa: T201
    return rows


def _why_not(r: dict) -> str:
    """Which of the conditions a result fails (for the baseline column)."""
    if r.get("ok"):
        return "handled"
    out = []
    if r.get("exit_code") == "traceback":
        out.append("traceback")
    elif r.get("exit_code") == 0:
        out.append("exit 0")
    elif "unrecognized arguments" in (r.get("message") or ""):
        out.append("option missing")
    if not r.get("names_file") and "option missing" not in out:
        out.append("file not named")
    if not r.get("names_problem") and "option missing" not in out and "traceback" not in out:
        out.append("problem not stated")
    if r.get("partial_files"):
        out.append(f"{len(r['partial_files'])} partial files")
    if r.get("good_items_done") is False:
        out.append("good items not done")
    return ", ".join(out)


def markdown_table(result: dict) -> str:
    """The README table: fault, command, exit code, partial files, the baseline's outcome, the message."""
    rows = ["| fault | command | exit | partial files | landed main | message now (excerpt) |",
            "|---|---|---|---|---|---|"]
    for r in result["cases"]:
        m = r["message"].split(" | ")[0]
        m = re.sub(r"^\d\d:\d\d:\d\d ERROR [\w.]+: ", "", m)
        m = re.sub(r"/tmp/fvlm_bad_inputs_\w+/", "…/", m).replace(str(REPO) + "/", "")
        m = (m[:137] + "...") if len(m) > 140 else m
        before = _why_not(r["before"]) if "before" in r else ""
        rows.append(f"| {r['fault']} | `{r['command']}` | {r['exit_code']} | {len(r['partial_files'])} | {before} | "
                    f"{m.replace('|', '/')} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "bad_inputs.json"))
    ap.add_argument("--baseline-src", default="", help="also run the matrix against this source tree (PYTHONPATH)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)  # write the rows of this process to a JSON file
    ap.add_argument("--table", action="store_true", help="print the README table of the --out JSON and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text(encoding="utf-8"))))  # noqa: T201
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.child:
        with tempfile.TemporaryDirectory(prefix="fvlm_bad_inputs_") as td:
            rows = run_matrix(Path(td))
        Path(args.child).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        return 0

    sys.path.insert(0, str(HERE))
    from machine import machine

    import fvlm

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fvlm_bad_inputs_") as td:
        rows = run_matrix(Path(td))
    result = {"machine": machine(), "fvlm_source": str(Path(fvlm.__file__).parent), "seconds":
              round(time.perf_counter() - t0, 1), "faults": len(rows), "handled": sum(r["ok"] for r in rows),
              "partial_files": sum(len(r["partial_files"]) for r in rows), "cases": rows}
    if args.baseline_src:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tf:
            child_out = tf.name
        env = {**os.environ, "PYTHONPATH": os.path.abspath(args.baseline_src)}
        subprocess.run([sys.executable, __file__, "--child", child_out], env=env, check=True)
        before = {r["case"]: r for r in json.loads(Path(child_out).read_text(encoding="utf-8"))}
        os.unlink(child_out)
        result["baseline"] = {"source": os.path.abspath(args.baseline_src),
                              "handled": sum(r["ok"] for r in before.values()),
                              "partial_files": sum(len(r["partial_files"]) for r in before.values())}
        for r in rows:
            b = before.get(r["case"], {})
            r["before"] = {k: b.get(k) for k in ("exit_code", "message", "partial_files", "names_file",
                                                 "names_problem", "good_items_done", "ok")}
        result["fixed_here"] = [r["case"] for r in rows if r["ok"] and not r["before"]["ok"]]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{result['handled']} of {result['faults']} faults handled; {result['partial_files']} partial files"  # noqa: T201
          + (f"; baseline {result['baseline']['handled']} handled" if args.baseline_src else "") + f" -> {out}")
    return 0 if result["handled"] == result["faults"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
