"""fvlm decompose --backend llm against a hostile local stub server (http.server in a thread): timeouts, HTTP 500,
garbage / partial JSON, huge bodies are retried a bounded number of times and reported per report; API keys and
URL credentials never reach logs, errors or outputs; exit 1 when the LLM was never used (unless accepted)."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from fvlm.cli import main
from fvlm.decompose import LLMConfig, decompose_reports
from fvlm.decompose.pipeline import read_reports

KEY = "sk-very-secret-key-123"
PASSWORD = "hunter2-p@ss"
REPORTS = [
    ("train_1_a_1", "Nodules in both lungs. Heart size is normal.", "Lung nodules."),
    ("train_2_a_1", "Emphysema in the left lung.", "Left lung emphysema."),
    ("train_3_a_1", "Both lungs are clear.", "No acute finding."),
]


def _valid_content(user: str) -> str:
    findings = user.split("FINDINGS:\n")[1].split("\n\nIMPRESSION:")[0]
    lung = [s.strip() + "." for s in findings.split(".") if "lung" in s.lower()]
    return json.dumps({"anatomies": {"lung": {"findings": lung, "impression": [], "abnormal": False}}})


class Stub:
    """An OpenAI-compatible endpoint; ``mode(n)`` gives the behaviour of request n (0-based)."""

    def __init__(self, modes):
        self.modes = modes
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                n = len(stub.requests)
                stub.requests.append({"auth": self.headers.get("Authorization"), "path": self.path})
                mode = stub.modes(n)
                if mode == "sleep":
                    time.sleep(1.5)
                    mode = "valid"
                if mode == "500":
                    self.send_response(500, f"boom {KEY}")  # a server that echoes the key must not leak it
                    self.end_headers()
                    return
                content = _valid_content(body["messages"][1]["content"])
                if mode == "garbage":
                    payload = b"<html>502 Bad Gateway " + KEY.encode() + b"</html>"
                elif mode == "partial":  # the answer cut off mid-way (max tokens)
                    payload = json.dumps({"choices": [{"message": {"content": content[: len(content) // 2]}}]}).encode()
                elif mode == "huge":
                    payload = b'{"choices": [{"message": {"content": "' + b"x" * (3 << 20) + b'"}}]}'
                else:
                    payload = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "FVLM_LLM_API_KEY", "FVLM_LLM_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def _df(rows=REPORTS) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["VolumeName", "Findings_EN", "Impressions_EN"])


def _cfg(url: str, tmp_path: Path, **kw) -> LLMConfig:
    base = dict(model="m", cache_dir=tmp_path / "cache", backoff=0.0, workers=1, timeout=5.0, max_retries=1,
                invalid_retries=1)
    return LLMConfig(url=url, **{**base, **kw})


@pytest.mark.parametrize("fault", ["500", "garbage", "partial", "huge"])
def test_fault_once_is_retried_then_answered(tmp_path, fault):
    """Each fault on the first request of a report: one retry, then the model's answer is used."""
    with Stub(lambda n: fault if n == 0 else "valid") as stub:
        desc, _, summary = decompose_reports(_df(REPORTS[:1]), "released", "llm",
                                             llm=_cfg(stub.url, tmp_path, max_response_bytes=1 << 20),
                                             progress=False)
    assert len(stub.requests) == 2
    assert summary.llm["ok"] == 1 and summary.llm["retries"] == 1 and summary.llm["fallbacks"] == []
    assert desc["train_1_a"] == {"lung": "Nodules in both lungs."}


@pytest.mark.parametrize("fault,status,phrase", [
    ("500", "error", "HTTP 500"), ("garbage", "invalid", "not an OpenAI chat completion"),
    ("partial", "invalid", "not JSON"), ("huge", "invalid", "max_response_bytes"),
    ("sleep", "error", "timed out")])
def test_persistent_fault_is_bounded_and_reported_per_report(tmp_path, fault, status, phrase):
    with Stub(lambda n: fault) as stub:
        t0 = time.perf_counter()
        cfg = _cfg(stub.url, tmp_path, timeout=0.5, max_response_bytes=1 << 20, api_key=KEY)
        desc, _, summary = decompose_reports(_df(), "released", "llm", llm=cfg, progress=False)
        seconds = time.perf_counter() - t0
    # bounded: errors 1 + max_retries attempts per report; invalid answers 1 + invalid_retries requests
    per_report = 2
    assert len(stub.requests) == per_report * len(REPORTS), len(stub.requests)
    assert seconds < 20
    fallbacks = summary.llm["fallbacks"]
    assert [f["scan"] for f in fallbacks] == ["train_1_a", "train_2_a", "train_3_a"]
    assert all(f["status"] == status and phrase in f["message"] for f in fallbacks), fallbacks
    assert summary.llm["ok"] == 0 and set(desc) == {"train_1_a", "train_2_a", "train_3_a"}  # rules fallback
    assert KEY not in json.dumps(summary.to_dict())


def test_credentials_never_in_logs_errors_or_outputs(tmp_path, capsys):
    """http://user:password@host/v1: Basic auth is sent; neither the password nor the key is written anywhere."""
    reports = tmp_path / "reports.csv"
    _df().to_csv(reports, index=False)
    with Stub(lambda n: "500" if n % 3 == 0 else ("garbage" if n % 3 == 1 else "valid")) as stub:
        url = f"http://alice:{PASSWORD.replace('@', '%40')}@127.0.0.1:{stub.port}/v1"
        rc = main(["--log-level", "DEBUG", "decompose", "--reports", str(reports), "--out", str(tmp_path / "out"),
                   "--backend", "llm", "--llm-url", url, "--llm-model", "m", "--llm-timeout", "5",
                   "--llm-retries", "1", "--llm-invalid-retries", "0", "--llm-workers", "1"])
    err = capsys.readouterr().err
    auth = stub.requests[0]["auth"]
    assert auth == "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert stub.requests[0]["path"] == "/v1/chat/completions"
    assert rc == 0
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file())
    for secret in (PASSWORD, PASSWORD.replace("@", "%40"), "alice:"):
        assert secret not in err and secret not in written, secret
    summary = json.loads((tmp_path / "out" / "decompose_summary.json").read_text())
    assert summary["llm"]["url"] == f"http://127.0.0.1:{stub.port}/v1/chat/completions"
    assert summary["llm"]["ok"] >= 1 and summary["llm"]["fallback_invalid"] + summary["llm"]["fallback_error"] >= 1
    # the key, echoed back by the server in an HTTP reason and a garbage body, is redacted too
    cfg = _cfg("http://u:pw1234@127.0.0.1:1/v1", tmp_path, api_key=KEY)
    assert KEY not in repr(cfg) and "pw1234" not in repr(cfg) and "pw1234" not in cfg.endpoint
    assert cfg.redact(f"x {KEY} http://u:pw1234@h/v1 pw1234") == "x *** http://***@h/v1 ***"


def test_never_used_llm_exits_non_zero_unless_accepted(tmp_path, capsys):
    reports = tmp_path / "reports.csv"
    _df().to_csv(reports, index=False)
    with Stub(lambda n: "500") as stub:
        args = ["decompose", "--reports", str(reports), "--out", str(tmp_path / "out"), "--backend", "llm",
                "--llm-url", stub.url, "--llm-model", "m", "--llm-timeout", "2", "--llm-retries", "0"]
        assert main(args) == 1
        assert "NEVER used" in capsys.readouterr().err
        assert main(args + ["--llm-accept-fallback"]) == 0
    assert (tmp_path / "out" / "desc_info.json").exists()  # the rules' outputs are complete either way


def test_timeout_option_bounds_a_silent_server(tmp_path):
    """A server that never answers: total time ~ reports x attempts x timeout, with the options given."""
    with Stub(lambda n: "sleep") as stub:
        t0 = time.perf_counter()
        _, _, summary = decompose_reports(_df(REPORTS[:2]), "released", "llm",
                                          llm=_cfg(stub.url, tmp_path, timeout=0.3, max_retries=0), progress=False)
        seconds = time.perf_counter() - t0
    assert summary.llm["fallback_error"] == 2 and len(stub.requests) == 2
    assert seconds < 0.3 * 2 + 2.0


def test_bad_reports_csv_names_the_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.csv: empty file"):
        read_reports(empty)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(ValueError, match=r"binary\.csv"):
        read_reports(binary)


def test_empty_report_does_not_win_over_non_empty_duplicate():
    df = _df([("train_1_a_1", "", "Not given."), ("train_1_a_2", "Emphysema in the left lung.", "Emphysema."),
              ("train_1_a_3", "", "")])
    desc, conc, summary = decompose_reports(df, "released", progress=False)
    assert desc["train_1_a"] and "lung" in desc["train_1_a"]
    assert summary.n_conflicting_rows == 0 and summary.n_empty_reports == 0
