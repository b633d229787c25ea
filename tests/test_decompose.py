"""fvlm decompose: sentence splitting, lexicon resolution, rules, outputs, evaluation, LLM route (fake endpoint)."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.cli import main
from fvlm.decompose import (
    PROMPT_VERSION,
    Lexicon,
    LLMConfig,
    RulesDecomposer,
    decompose_reports,
    evaluate_decomposition,
    load_lexicon,
    normalise_sentence,
    split_sentences,
)
from fvlm.decompose.llm import InvalidAnswer, parse_answer

log = logging.getLogger(__name__)
FIXTURE = Path(__file__).parent / "data" / "decompose_sentences.json"
#: measured: 104/105 = 0.990 exact match (anatomy set and per-anatomy normality); batch 2, written after the rules
#: were frozen, scored 31/32 on its first run. The floor leaves room for lexicon changes that trade a sentence
#: for broader coverage.
FIXTURE_FLOOR = 0.95


@pytest.fixture(scope="module")
def table() -> AnatomyTable:
    return load_anatomy_table("released")


@pytest.fixture(scope="module")
def rules(table) -> RulesDecomposer:
    return RulesDecomposer(table)


def _reports(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["VolumeName", "Findings_EN", "Impressions_EN"]).assign(
        ClinicalInformation_EN="Not given.", Technique_EN="Non-contrast chest CT.")


# ------------------------------------------------------------------------------------------------ sentences
def test_split_sentences_keeps_abbreviations_decimals_and_measurements():
    text = ("A 3.5 mm nodule (image no. 45) is seen, approx. 2 cm from the pleura, e.g. in segment 6. "
            "Stable vs. previous? Dr. Smith and St. Mary hospital were informed.No effusion.\n"
            "1. Emphysema. 2. Hiatal hernia.")
    assert split_sentences(text) == [
        "A 3.5 mm nodule (image no. 45) is seen, approx. 2 cm from the pleura, e.g. in segment 6.",
        "Stable vs. previous?",
        "Dr. Smith and St. Mary hospital were informed.",
        "No effusion.",
        "Emphysema.",
        "Hiatal hernia.",
    ]
    assert split_sentences("Not given.") == [] and split_sentences(float("nan")) == [] and split_sentences(None) == []
    assert normalise_sentence(' "Nodule" (3.5 mm), right lobe. ') == "nodule 3.5 mm right lobe"
    assert normalise_sentence("35 mm.") != normalise_sentence("3.5 mm.")


# ----------------------------------------------------------------------------------------------- lexicon
def test_lexicon_resolves_concepts_by_name_class_and_fallback(table):
    lex = load_lexicon()
    released = lex.resolve(table)
    assert released["lung"] == ("lung",) and released["pleura"] == ("lung",)  # pleura -> lung (fallback)
    assert released["bronchi"] == ("lung",)  # intrapulmonary bronchi lie in the lung
    assert released["trachea"] == () and released["mediastinum"] == () and released["liver"] == ()
    assert released["great_vessels"] == ()  # the aorta has its own sentences; the great vessels are other classes
    # a richer table: anatomies found by TotalSegmentator class (trachea) and by name (pleura, mediastinum)
    extended = AnatomyTable.from_dict({"name": "ext", "anatomies": [
        {"name": "lung", "classes": ["lung_upper_lobe_left", "lung_lower_lobe_left"]},
        {"name": "windpipe", "classes": ["trachea"]},
        {"name": "pleura", "classes": ["lung_upper_lobe_right"]},
        {"name": "mediastinum", "classes": ["thyroid_gland"]},
        {"name": "spine", "classes": ["vertebrae_T5", "vertebrae_T6"]},
    ]})
    res = lex.resolve(extended)
    assert res["trachea"] == ("windpipe",) and res["bronchi"] == ("lung",)
    assert res["pleura"] == ("pleura",) and res["mediastinum"] == ("mediastinum",)
    assert res["spine"] == ("spine",) and res["bones"] == ("spine",)
    r = RulesDecomposer(extended, lex)
    units = r.analyse("Trachea and both main bronchi are open, bilateral pleural effusion is present.")
    assert [(u.anatomies, u.abnormal) for u in units] == [
        (("windpipe",), {"windpipe": False}), (("pleura",), {"pleura": True})]


def test_every_shipped_table_is_covered_by_the_lexicon():
    from fvlm.anatomy import available_tables

    lex = load_lexicon()
    for name in available_tables():
        t = load_anatomy_table(name)
        reached = {a for v in lex.resolve(t).values() for a in v}
        assert reached == set(t.names), f"table {name}: no lexicon concept reaches {set(t.names) - reached}"


def test_extended_table_sentences():
    r = RulesDecomposer(load_anatomy_table("extended"))
    cases = {
        "No enlarged lymph nodes in prevascular, pre-paratracheal, subcarinal or bilateral hilar-axillary "
        "pathological dimensions were detected.": {"mediastinum": False},
        "An enlarged lymph node, 15 mm in short axis, is seen in the subcarinal region.": {"mediastinum": True},
        "Lymph nodes of normal size are seen in the mediastinum.": {"mediastinum": False},
        "Trachea, both main bronchi are open.": {"trachea": False},
        "Degenerative osteophytes are seen in the thoracic vertebrae.": {"bones": True},
        "Bone structures in the study area are natural.": {"bones": False},
        "Pleural effusion-thickening was not detected.": {"lung": False},
        "Pacemaker leads in the right ventricle.": {"heart": True},
    }
    for text, expected in cases.items():
        got = {a: u.abnormal[a] for u in r.analyse(text) for a in u.anatomies}
        assert got == expected, text


def test_adding_an_anatomy_is_a_data_change(tmp_path):
    """A new anatomy needs only a table entry and a lexicon concept (JSON), no code."""
    tab = AnatomyTable.from_dict({"name": "thy", "anatomies": [
        {"name": "lung", "classes": ["lung_upper_lobe_left"]}, {"name": "thyroid", "classes": ["thyroid_gland"]}]})
    text = "A 7 mm hypodense nodule is seen in the right thyroid lobe."
    # shipped lexicon: the thyroid concept resolves by name, so the nodule is not given to the lung
    assert [u.anatomies for u in RulesDecomposer(tab).analyse(text)] == [("thyroid",)]
    # a lexicon without that concept: the sentence defaults to the lung ("nodule") until the concept is added
    data = json.loads(Path(load_lexicon().source).read_text())
    del data["concepts"]["thyroid"]
    assert RulesDecomposer(tab, Lexicon(data)).analyse(text)[0].anatomies == ("lung",)
    data["concepts"]["gland_of_neck"] = {"classes": ["thyroid_gland"], "terms": ["thyroid*"]}
    p = tmp_path / "lex.json"
    p.write_text(json.dumps(data))
    units = RulesDecomposer(tab, load_lexicon(p)).analyse(text)
    assert units[0].anatomies == ("thyroid",) and units[0].abnormal == {"thyroid": True}
    with pytest.raises(ValueError, match="unknown concept"):
        Lexicon({**data, "concepts": {"x": {"terms": ["x"], "fallback": ["nope"]}}})
    with pytest.raises(ValueError, match="listed under both"):
        Lexicon({**data, "concepts": {"x": {"terms": ["Vena-cava"]}, "y": {"terms": ["vena cava"]}}})


# ------------------------------------------------------------------------------------------------- rules
def test_hand_written_sentences_accuracy(rules):
    """Hand-written CT-RATE-style sentences: anatomy assignment and normality per anatomy (exact match)."""
    sentences = json.loads(FIXTURE.read_text())["sentences"]
    assert len(sentences) >= 40
    exact: dict[int, list[bool]] = {}
    anatomy_ok = normal_ok = normal_n = 0
    wrong = []
    for s in sentences:
        got: dict[str, str] = {}
        for u in rules.analyse(s["text"]):
            for a in u.anatomies:
                got[a] = "abnormal" if got.get(a) == "abnormal" or u.abnormal[a] else "normal"
        exp = s["expected"]
        exact.setdefault(s["batch"], []).append(got == exp)
        anatomy_ok += set(got) == set(exp)
        for a in set(got) & set(exp):
            normal_n += 1
            normal_ok += got[a] == exp[a]
        if got != exp:
            wrong.append(f"{s['text']!r}: got {got}, expected {exp}")
    n = len(sentences)
    acc = sum(map(sum, exact.values())) / n
    per_batch = ", ".join(f"batch {b}: {sum(v)}/{len(v)}" for b, v in sorted(exact.items()))
    log.warning("decompose fixture: exact %.3f (%s), anatomy sets %.3f, normality %.3f over %d anatomies; wrong: %s",
                acc, per_batch, anatomy_ok / n, normal_ok / max(normal_n, 1), normal_n, wrong)
    assert acc >= FIXTURE_FLOOR, f"fixture accuracy {acc:.3f} < {FIXTURE_FLOOR}:\n" + "\n".join(wrong)


def test_clause_split_negation_scope_and_hedges(rules):
    units = rules.analyse("Heart size is normal, and the ascending aorta is dilated to 45 mm.")
    assert [(u.text, u.anatomies, u.abnormal) for u in units] == [
        ("Heart size is normal.", ("heart",), {"heart": False}),
        ("The ascending aorta is dilated to 45 mm.", ("aorta",), {"aorta": True}),
    ]
    one = rules.analyse("No pleural effusion, mild cardiomegaly.")  # no clause predicate: one unit, two anatomies
    assert len(one) == 1 and one[0].abnormal == {"lung": False, "heart": True}
    assert rules.analyse("Nodule is not calcified.")[0].abnormal == {"lung": True}
    assert rules.analyse("Pneumothorax cannot be excluded.")[0].abnormal == {"lung": True}
    assert rules.analyse("No pneumothorax.")[0].abnormal == {"lung": False}
    assert rules.analyse("The liver is enlarged.")[0].anatomies == ()  # outside the table: dropped


def test_decompose_reports_authors_format(table):
    findings = ("Trachea, both main bronchi are open. Mediastinal main vascular structures, heart contour, size are "
                "normal. Millimetric nonspecific nodules were observed in both lungs. It measures 4 mm. "
                "Calcific atheroma plaques in the aortic arch. The liver is normal.")
    impression = "1. Millimetric nonspecific nodules in both lungs. 2. No pericardial effusion. 3. Aortic atheroma?"
    df = _reports([
        ("train_7_a_1.nii.gz", findings, impression),
        ("train_7_a_2.nii.gz", findings, impression),  # same scan, same report: deduplicated
        ("train_7_b_1", "Not given.", "Not given."),
        ("train_8_a_1", "Heart volume increased.", "Cardiomegaly."),
        ("train_8_a_2", "Heart is normal.", "Normal."),  # same scan, different report: first one wins
        ("not_a_volume", "x", "y"),
    ])
    desc, conc, summary = decompose_reports(df, table, progress=False)
    assert desc["train_7_a"] == {
        "lung": "Millimetric nonspecific nodules were observed in both lungs. It measures 4 mm.",
        "heart": "Mediastinal main vascular structures, heart contour, size are normal.",
        "aorta": "Calcific atheroma plaques in the aortic arch.",
    }
    # normal impression sentences are dropped; the heart has no conc entry = normal
    assert conc["train_7_a"] == {"lung": "Millimetric nonspecific nodules in both lungs.", "aorta": "Aortic atheroma?"}
    assert desc["train_7_b"] == {} and conc["train_7_b"] == {}
    assert conc["train_8_a"] == {"heart": "Cardiomegaly."}
    assert (summary.n_rows, summary.n_scans, summary.n_duplicate_rows, summary.n_conflicting_rows) == (6, 3, 1, 1)
    assert summary.n_empty_reports == 1 and [f["volume"] for f in summary.failures] == ["not_a_volume"]
    assert summary.per_anatomy["aorta"] == {"desc": 1, "conc": 1}


# -------------------------------------------------------------------------------------------- evaluation
def _write(d: Path, desc: dict, conc: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "desc_info.json").write_text(json.dumps(desc))
    (d / "conc_info.json").write_text(json.dumps(conc))
    return d


def test_evaluate_counts(tmp_path, table):
    gold = _write(tmp_path / "gold",
                  {"s_1_a": {"lung": "Nodule. Emphysema.", "heart": "Heart normal."}, "s_2_a": {"aorta": "Aorta ok."}},
                  {"s_1_a": {"lung": "Nodule."}, "s_2_a": {}})
    pred = _write(tmp_path / "pred",
                  {"s_1_a": {"lung": "nodule", "heart": "Heart normal. Extra."}, "s_3_a": {}},
                  {"s_1_a": {"lung": "Nodule.", "heart": "Heart normal."}})
    r = evaluate_decomposition(pred, gold, table)
    # 2 scans x 4 anatomies; one disagreement (heart of s_1_a predicted abnormal)
    assert r["agreement"]["accuracy"] == pytest.approx(7 / 8) and r["agreement"]["n"] == 8
    assert r["agreement"]["per_anatomy"]["heart"]["fp"] == 1 and r["agreement"]["per_anatomy"]["lung"]["tp"] == 1
    d = r["sentences"]["desc"]  # tp: nodule, heart normal; fp: extra; fn: emphysema, aorta ok
    assert (d["tp"], d["fp"], d["fn"]) == (2, 1, 2) and d["precision"] == pytest.approx(2 / 3)
    c = r["sentences"]["conc"]
    assert (c["tp"], c["fp"], c["fn"]) == (1, 1, 0)
    assert r["n_scans"] == 2 and r["n_scans_missing"] == 1 and r["n_scans_extra"] == 1
    with pytest.raises(ValueError, match="not in anatomy table"):
        evaluate_decomposition(_write(tmp_path / "bad", {"s_1_a": {"liver": "x"}}, {}), gold, table)
    with pytest.raises(ValueError, match="shares no scan"):
        evaluate_decomposition(_write(tmp_path / "other", {"z_1_a": {}}, {}), gold, table)


def test_cli_decompose_and_evaluate(tmp_path, table):
    csv = tmp_path / "reports.csv"
    _reports([("valid_1_a_1", "Emphysema is seen in both lungs. Heart size is normal.", "Emphysema."),
              ("valid_2_a_1", "Hiatal hernia is observed.", "Hiatal hernia.")]).to_csv(csv, index=False)
    csv2 = tmp_path / "more.csv"
    _reports([("valid_3_a_1", "No pleural effusion.", "Not given.")]).to_csv(csv2, index=False)
    out = tmp_path / "out"
    assert main(["decompose", "--reports", f"{csv},{csv2}", "--out", str(out)]) == 0
    desc = json.loads((out / "desc_info.json").read_text())
    assert set(desc) == {"valid_1_a", "valid_2_a", "valid_3_a"}
    assert json.loads((out / "decompose_summary.json").read_text())["backend"] == "rules"
    # a prediction evaluated against itself is perfect; evaluation.json lands in the prediction directory
    assert main(["decompose", "--evaluate", str(out), "--pred", str(out)]) == 0
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["agreement"]["accuracy"] == 1.0 and ev["sentences"]["desc"]["recall"] == 1.0
    # unusable files: non-zero exit
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "desc_info.json").write_text("{not json")
    (tmp_path / "broken" / "conc_info.json").write_text("{}")
    assert main(["decompose", "--evaluate", str(out), "--pred", str(tmp_path / "broken")]) != 0
    assert main(["decompose", "--evaluate", str(tmp_path / "missing"), "--pred", str(out)]) != 0
    # a row that cannot be processed: outputs for the others, exit code 1
    bad = tmp_path / "bad.csv"
    _reports([("valid_1_a_1", "Emphysema.", "Emphysema."), ("garbage", "x", "y")]).to_csv(bad, index=False)
    assert main(["decompose", "--reports", str(bad), "--out", str(tmp_path / "o2")]) == 1
    assert "valid_1_a" in json.loads((tmp_path / "o2" / "desc_info.json").read_text())
    assert main(["decompose", "--reports", str(tmp_path / "nope.csv"), "--out", str(out)]) == 2


# ------------------------------------------------------------------------------------------ LLM backend
class _FakeLLM:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 with a script of behaviours (one per request)."""

    def __init__(self, script: list[str] | None = None):
        self.script = list(script or [])
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                mode = fake.script.pop(0) if fake.script else "valid"
                if mode == "500":
                    self.send_response(500)
                    self.end_headers()
                    return
                user = body["messages"][1]["content"]
                findings = user.split("FINDINGS:\n")[1].split("\n\nIMPRESSION:")[0]
                impression = user.split("IMPRESSION:\n")[1]
                # a deterministic "model": lung gets every sentence that mentions the lung
                lung_f = [s for s in split_sentences(findings) if "lung" in s.lower()]
                lung_i = [s for s in split_sentences(impression) if "lung" in s.lower()]
                answer = {"anatomies": {"lung": {"findings": lung_f, "impression": lung_i, "abnormal": bool(lung_i)}}}
                if mode == "invalid":
                    answer["anatomies"]["liver"] = {"findings": [], "impression": [], "abnormal": False}
                content = json.dumps(answer)
                if mode == "fenced":
                    content = f"```json\n{content}\n```"
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _FakeLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def no_proxy(monkeypatch):
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


_LLM_REPORTS = [
    ("train_1_a_1", "Millimetric nodules in both lungs. Heart size is normal.", "Lung nodules."),
    ("train_2_a_1", "Emphysema in the left lung. Hiatal hernia is seen.", "Left lung emphysema. Hiatal hernia."),
    ("train_3_a_1", "Aorta is ectatic. Both lungs are clear.", "Aortic ectasia."),
]


def test_llm_backend_valid_invalid_retry_and_cache(tmp_path, table, no_proxy, monkeypatch):
    monkeypatch.setenv("FVLM_LLM_API_KEY", "secret-token")
    df = _reports(_LLM_REPORTS)
    rules_desc, rules_conc, _ = decompose_reports(df, table, progress=False)
    cfg = dict(model="fake-model", cache_dir=tmp_path / "cache", backoff=0.01, workers=1, timeout=10,
               invalid_retries=0)
    # report 1: valid; report 2: invalid answer (unknown anatomy) -> rules; report 3: HTTP 500, then fenced JSON
    with _FakeLLM(["valid", "invalid", "500", "fenced"]) as fake:
        desc, conc, summary = decompose_reports(df, table, "llm", llm=LLMConfig(url=fake.url, **cfg), progress=False)
    assert len(fake.requests) == 4
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer secret-token" for r in fake.requests)
    assert fake.requests[0]["body"]["model"] == "fake-model" and fake.requests[0]["body"]["temperature"] == 0
    assert desc["train_1_a"] == {"lung": "Millimetric nodules in both lungs."}  # the model's answer, not the rules'
    assert conc["train_1_a"] == {"lung": "Lung nodules."}
    assert desc["train_2_a"] == rules_desc["train_2_a"] and conc["train_2_a"] == rules_conc["train_2_a"]  # fallback
    assert desc["train_3_a"] == {"lung": "Both lungs are clear."} and conc["train_3_a"] == {}  # after the retry
    llm = summary.llm
    assert llm["prompt_version"] == PROMPT_VERSION and llm["model"] == "fake-model"
    counts = (llm["ok"], llm["invalid"], llm["retries"], llm["fallback_invalid"], llm["fallback_error"])
    assert counts == (2, 1, 1, 1, 0)
    cached = sorted((tmp_path / "cache").rglob("*.json"))
    assert len(cached) == 2 and json.loads(cached[0].read_text())["prompt_version"] == PROMPT_VERSION

    # second run: valid answers come from the cache (no request); the invalid one is asked again
    with _FakeLLM() as fake2:
        desc2, conc2, summary2 = decompose_reports(df, table, "llm", llm=LLMConfig(url=fake2.url, **cfg),
                                                   progress=False)
    assert len(fake2.requests) == 1 and summary2.llm["cached"] == 2
    assert desc2["train_1_a"] == desc["train_1_a"] and desc2["train_3_a"] == desc["train_3_a"]
    # another model (or prompt version or table) is another cache key; once cached, nothing is sent
    with _FakeLLM() as fake3:
        other = LLMConfig(url=fake3.url, **{**cfg, "model": "other"})
        decompose_reports(df.iloc[:1], table, "llm", llm=other, progress=False)
        assert len(fake3.requests) == 1
        _, _, summary3 = decompose_reports(df.iloc[:1], table, "llm", llm=other, progress=False)
        assert len(fake3.requests) == 1 and summary3.llm["cached"] == 1 and summary3.llm["requests"] == 0


def test_llm_backend_unreachable_falls_back_to_rules(tmp_path, table, no_proxy):
    with _FakeLLM() as fake:
        url = fake.url  # the server is closed on exit: connections are refused afterwards
    df = _reports(_LLM_REPORTS)
    cfg = LLMConfig(url=url, model="m", cache_dir=tmp_path / "c", backoff=0.0, max_retries=1, workers=2,
                    max_consecutive_errors=2)
    desc, conc, summary = decompose_reports(df, table, "llm", llm=cfg, progress=False)
    rules_desc, rules_conc, _ = decompose_reports(df, table, progress=False)
    assert desc == rules_desc and conc == rules_conc
    assert summary.llm["fallback_error"] == 3 and summary.llm["ok"] == 0 and not summary.failures


def test_parse_answer_validation(table, monkeypatch):
    monkeypatch.delenv("FVLM_LLM_URL", raising=False)
    ok = parse_answer('{"anatomies": {"heart": {"findings": ["Heart normal."], "impression": [], "abnormal": false}}}',
                      table)
    assert ok == {"heart": {"findings": ["Heart normal."], "impression": [], "abnormal": False}}
    for bad, why in [
        ("not json", "not JSON"),
        ('{"lung": {}}', "exactly"),
        ('{"anatomies": {"spleen": {"findings": [], "impression": [], "abnormal": false}}}', "unknown anatomy"),
        ('{"anatomies": {"lung": {"findings": "text", "impression": [], "abnormal": false}}}', "list of strings"),
        ('{"anatomies": {"lung": {"findings": [], "impression": [], "abnormal": "yes"}}}', "true or false"),
        ('{"anatomies": {"lung": {"findings": []}}}', "expected keys"),
    ]:
        with pytest.raises(InvalidAnswer, match=why):
            parse_answer(bad, table)
    with pytest.raises(ValueError, match="no endpoint URL"):
        LLMConfig(url="", model="m")


# ------------------------------------------------------------------------------------- synthetic truth
_SYNTH_LABELS = [
    ["Emphysema", "Lung nodule", "Arterial wall calcification"],
    ["Cardiomegaly", "Pericardial effusion", "Pleural effusion"],
    ["Coronary artery wall calcification", "Hiatal hernia", "Atelectasis"],
    ["Lung opacity", "Consolidation", "Lymphadenopathy"],
    ["Pulmonary fibrotic sequela", "Mosaic attenuation pattern", "Bronchiectasis"],
    ["Peribronchial thickening", "Interlobular septal thickening", "Medical material"],
    [],
    *([None] * 13),  # real CT-RATE label rows drawn by frequency
]


def test_rules_reproduce_synthetic_anatomy_texts(tmp_path, table):
    """The generator knows which sentence is about which anatomy: the rules must reach >= 0.95 on it."""
    from fvlm.synth import generate_case

    rows, gold_desc, gold_conc = [], {}, {}
    anatomy = None
    for k, labels in enumerate(_SYNTH_LABELS):
        case = generate_case(1000 + k, labels, shape=(4, 16, 16), anatomy=anatomy)  # tiny volume: reports matter
        anatomy = anatomy or case.scene.anatomy
        rows.append((f"train_{k + 1}_a_1", case.report.findings, case.report.impression))
        gold_desc[f"train_{k + 1}_a"], gold_conc[f"train_{k + 1}_a"] = case.anatomy_texts(table)
    desc, conc, _ = decompose_reports(_reports(rows), table, progress=False)
    r = evaluate_decomposition(_write(tmp_path / "pred", desc, conc), _write(tmp_path / "gold", gold_desc, gold_conc),
                               table)
    s = r["sentences"]
    log.warning("decompose synthetic (%d scans): agreement %.3f, desc P %.3f R %.3f, conc P %.3f R %.3f",
                r["n_scans"], r["agreement"]["accuracy"], s["desc"]["precision"], s["desc"]["recall"],
                s["conc"]["precision"], s["conc"]["recall"])
    assert r["agreement"]["accuracy"] >= 0.95
    for kind in ("desc", "conc"):
        assert s[kind]["precision"] >= 0.95 and s[kind]["recall"] >= 0.95, (kind, s[kind])
