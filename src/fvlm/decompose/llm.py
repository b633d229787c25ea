"""The LLM backend: an OpenAI-compatible chat endpoint (vLLM, Ollama, llama.cpp server, ...).

``POST {url}/chat/completions`` with a versioned prompt (:data:`PROMPT_VERSION`) asking for one JSON
object per report::

    {"anatomies": {"lung": {"findings": ["..."], "impression": ["..."], "abnormal": true}, ...}}

``findings`` / ``impression`` are the report's sentences about the anatomy (copied verbatim),
``abnormal`` whether the impression states an abnormality of it. Answers are validated against the anatomy
table (unknown anatomy keys, missing keys or wrong types -> invalid). Transport errors and timeouts
(``timeout`` seconds per attempt), HTTP 429 and 5xx are retried ``max_retries`` times with exponential
backoff; other HTTP errors are not. Invalid answers (garbage, truncated or partial JSON, a body larger than
``max_response_bytes``, which is never read further) are asked again ``invalid_retries`` times. Valid answers
are cached on disk, keyed by a hash of (prompt version, model, anatomy table, report text): a second run sends
no request. The caller falls back to the rules backend when :meth:`LLMDecomposer.decompose` returns no
decomposition, and reports that per report.

Secrets: the API key (``Authorization: Bearer``) and credentials in the URL (``http://user:password@host/v1``,
sent as HTTP Basic authentication) are kept out of every log line, error message and output
(:meth:`LLMConfig.redact`; :attr:`LLMConfig.endpoint` never holds them).

Only the standard library is used for HTTP (``urllib``), so the backend adds no dependency.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fvlm.anatomy import AnatomyTable
from fvlm.decompose.base import Decomposition
from fvlm.decompose.sentences import is_empty_section, normalise_sentence
from fvlm.io import atomic_write_text

log = logging.getLogger(__name__)

#: bump whenever SYSTEM_PROMPT, the user message layout or the answer schema changes (it keys the cache)
PROMPT_VERSION = "fvlm-decompose-llm/1"

SYSTEM_PROMPT = """\
You split chest CT radiology reports into per-anatomy texts for training a vision-language model.
You receive the report's FINDINGS and IMPRESSION sections and a list of anatomies (with the structures each
one covers). For every listed anatomy return:
- "findings": the FINDINGS sentences that describe this anatomy, copied verbatim, in report order. Include
  normal statements ("Heart size is normal.") as well as abnormal ones. A sentence that describes several
  anatomies goes to each of them; if it joins independent clauses about different anatomies, you may give
  each anatomy only its own clause, copied verbatim.
- "impression": the IMPRESSION sentences that state an ABNORMALITY of this anatomy, copied verbatim. Leave
  out impression sentences that only say the anatomy is normal.
- "abnormal": true if the impression states an abnormality of this anatomy, else false. Hedged statements
  ("possible", "cannot be excluded", "suspicious for", "?") count as abnormal; negated ones ("no", "not
  observed", "within normal limits") do not.
Sentences about structures not covered by any listed anatomy are left out. Never invent or rephrase text.
Answer with one JSON object and nothing else, exactly of this form:
{"anatomies": {"<anatomy>": {"findings": ["..."], "impression": ["..."], "abnormal": false}}}
Use only the listed anatomy names as keys; an anatomy the report does not mention may be omitted."""


class InvalidAnswer(ValueError):
    """The model's answer is not valid JSON of the expected shape."""


class LLMError(RuntimeError):
    """The endpoint could not be reached or kept failing (retries exhausted)."""


_USERINFO = re.compile(r"(?i)\b(https?://)[^/@\s]*@")


@dataclass
class LLMConfig:
    """Where and how to call the model. ``url``/``model``/``api_key`` default to FVLM_LLM_URL /
    FVLM_LLM_MODEL / FVLM_LLM_API_KEY; ``timeout`` (per attempt) and ``backoff`` are in seconds.

    Credentials in the URL are moved out of ``url`` on construction (into HTTP Basic authentication); the
    API key and those credentials are excluded from ``repr`` and removed from messages by :meth:`redact`.
    """

    url: str = ""
    model: str = ""
    api_key: str = field(default="", repr=False)
    cache_dir: str | Path | None = None
    timeout: float = 60.0
    max_retries: int = 2  # retries after the first attempt (transport errors, timeouts, HTTP 429/5xx)
    invalid_retries: int = 1  # further requests after an invalid answer (garbage or partial JSON)
    backoff: float = 1.0  # sleep backoff * 2**attempt between attempts
    workers: int = 4  # concurrent requests (local servers batch them)
    max_consecutive_errors: int = 8  # then stop calling the endpoint and fall back for the rest
    max_response_bytes: int = 4 * 1024 * 1024  # a larger body is not read (an answer is a few kB)
    basic_auth: tuple[str, str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url or os.environ.get("FVLM_LLM_URL", "")
        self.model = self.model or os.environ.get("FVLM_LLM_MODEL", "")
        self.api_key = self.api_key or os.environ.get("FVLM_LLM_API_KEY", "")
        if not self.url:
            raise ValueError("LLM backend: no endpoint URL (--llm-url or FVLM_LLM_URL), e.g. http://127.0.0.1:8000/v1")
        if not self.model:
            raise ValueError("LLM backend: no model name (--llm-model or FVLM_LLM_MODEL)")
        parts = urllib.parse.urlsplit(self.url)
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            self.basic_auth = (urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or ""))
            host = parts.netloc.rsplit("@", 1)[1]
            self.url = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
        if not re.match(r"https?://", self.url):
            raise ValueError(f"LLM backend: URL must start with http:// or https://, got {self.redact(self.url)!r}")
        if not self.timeout > 0:
            raise ValueError(f"LLM backend: timeout must be > 0 seconds, got {self.timeout}")
        for name in ("max_retries", "invalid_retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"LLM backend: {name} must be >= 0, got {getattr(self, name)}")
        if self.workers < 1 or self.max_response_bytes < 1024:
            raise ValueError("LLM backend: workers must be >= 1 and max_response_bytes >= 1024")

    @property
    def endpoint(self) -> str:
        """The chat-completions URL, without credentials (safe to log)."""
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def secrets(self) -> list[str]:
        out = [self.api_key] if self.api_key else []
        if self.basic_auth:
            user, password = self.basic_auth
            out += [x for x in (f"{user}:{password}", password,
                                urllib.parse.quote(password, safe=""), user if password else "") if len(x) >= 3]
        return sorted(set(out), key=len, reverse=True)

    def redact(self, text: object) -> str:
        """``text`` with the API key, URL credentials and any ``scheme://userinfo@`` replaced by ``***``."""
        s = _USERINFO.sub(r"\1***@", str(text))
        for secret in self.secrets():
            s = s.replace(secret, "***")
        return s


def _class_list(classes: tuple[str, ...]) -> str:
    """Readable class list; numbered runs are shortened ("vertebrae T1-T12", "rib left 1-12")."""
    groups: dict[str, list[int]] = {}
    order: list[str] = []
    for c in classes:
        m = re.fullmatch(r"(.*?)(\d+)", c)
        key = m.group(1) if m else c
        if key not in groups:
            groups[key] = []
            order.append(key)
        if m:
            groups[key].append(int(m.group(2)))
    parts = []
    for key in order:
        nums = sorted(groups[key])
        name = key.replace("_", " ")
        if not nums:
            parts.append(name)
        elif nums == list(range(nums[0], nums[-1] + 1)) and len(nums) > 2:
            letter = "" if key.endswith("_") else key.rsplit("_", 1)[-1]  # "vertebrae_T" -> T1-T12
            parts.append(f"{name}{nums[0]}-{letter}{nums[-1]}")
        else:
            parts.extend(f"{name}{n}" for n in nums)
    return ", ".join(parts)


def anatomy_descriptions(table: AnatomyTable, covers: dict[str, list[str]] | None = None) -> str:
    """The anatomy list of the user message: name, TotalSegmentator classes and covered lexicon regions."""
    lines = []
    for a in table.anatomies:
        extra = sorted(set(covers.get(a.name, [])) - {a.name}) if covers else []
        parts = _class_list(a.classes)
        also = f"; also covers: {', '.join(x.replace('_', ' ') for x in extra)}" if extra else ""
        lines.append(f"- {a.name}: {parts}{also}")
    return "\n".join(lines)


def build_messages(findings: str, impression: str, anatomy_list: str) -> list[dict[str, str]]:
    """Chat messages for one report."""
    user = (f"ANATOMIES:\n{anatomy_list}\n\nFINDINGS:\n{findings or '(none)'}\n\n"
            f"IMPRESSION:\n{impression or '(none)'}")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def cache_key(model: str, table: AnatomyTable, findings: str, impression: str, anatomy_list: str) -> str:
    """sha256 of (prompt version, model, anatomy table, report text); the anatomy list text is included too."""
    payload = json.dumps([PROMPT_VERSION, SYSTEM_PROMPT, model, [[a.name, list(a.classes)] for a in table.anatomies],
                          anatomy_list, findings, impression], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def parse_answer(content: str, table: AnatomyTable) -> dict[str, dict]:
    """Validate a model answer; returns ``{anatomy: {"findings": [...], "impression": [...], "abnormal": bool}}``.

    Raises :class:`InvalidAnswer` naming the problem (not JSON, unknown anatomy, wrong type, missing key).
    """
    text = content.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)
    if fence:  # many chat models wrap JSON in a code fence even when told not to
        text = fence.group(1)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidAnswer(f"not JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(obj, dict) or set(obj) != {"anatomies"} or not isinstance(obj["anatomies"], dict):
        raise InvalidAnswer('expected exactly {"anatomies": {...}}')
    out = {}
    for name, entry in obj["anatomies"].items():
        if name not in table.names:
            raise InvalidAnswer(f"unknown anatomy {name!r} (table {table.name!r}: {list(table.names)})")
        if not isinstance(entry, dict) or set(entry) != {"findings", "impression", "abnormal"}:
            raise InvalidAnswer(f"anatomy {name!r}: expected keys findings, impression, abnormal")
        for key in ("findings", "impression"):
            value = entry[key]
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise InvalidAnswer(f"anatomy {name!r}: {key!r} must be a list of strings")
        if not isinstance(entry["abnormal"], bool):
            raise InvalidAnswer(f"anatomy {name!r}: 'abnormal' must be true or false")
        out[name] = {
            "findings": [s.strip() for s in entry["findings"] if s.strip()],
            "impression": [s.strip() for s in entry["impression"] if s.strip()],
            "abnormal": entry["abnormal"],
        }
    return out


def answer_to_decomposition(answer: dict[str, dict], table: AnatomyTable) -> Decomposition:
    """A validated answer as a :class:`Decomposition` (impression kept only for abnormal anatomies)."""
    out = Decomposition()
    for a in table.names:  # table order
        entry = answer.get(a)
        if not entry:
            continue
        if entry["findings"]:
            out.findings[a] = list(entry["findings"])
        if entry["abnormal"] and entry["impression"]:
            out.impression[a] = list(entry["impression"])
    return out


class LLMDecomposer:
    """Decompose reports with a chat model; thread-safe (one instance serves a thread pool)."""

    def __init__(self, table: AnatomyTable, config: LLMConfig, covers: dict[str, list[str]] | None = None):
        self.table = table
        self.config = config
        self.anatomy_list = anatomy_descriptions(table, covers)
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else None
        self._lock = threading.Lock()
        self._consecutive_errors = 0
        self._circuit_open = False
        self.stats = {"requests": 0, "retries": 0, "ok": 0, "cached": 0, "invalid": 0, "error": 0, "not_verbatim": 0}

    # ----------------------------------------------------------------------------------- cache
    def _cache_path(self, key: str) -> Path | None:
        return self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir else None

    def _cache_get(self, key: str) -> dict | None:
        p = self._cache_path(key)
        if p is None or not p.exists():
            return None
        try:
            with open(p) as f:
                entry = json.load(f)
            return parse_answer(json.dumps(entry["answer"]), self.table)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("decompose llm: ignoring unreadable cache entry %s (%s)", p, e)
            return None

    def _cache_put(self, key: str, answer: dict) -> None:
        p = self._cache_path(key)
        if p is None:
            return
        entry = {"prompt_version": PROMPT_VERSION, "model": self.config.model, "table": self.table.name,
                 "answer": {"anatomies": answer}}
        atomic_write_text(p, json.dumps(entry, ensure_ascii=False, indent=1))

    # ------------------------------------------------------------------------------------ HTTP
    def _post(self, messages: list[dict[str, str]]) -> str:
        """Send one chat request; returns the message content. Raises :class:`LLMError` when retries run out,
        :class:`InvalidAnswer` when the server answers 200 with something that is not a chat completion (or a
        body over ``max_response_bytes``). Messages never hold secrets."""
        cfg = self.config
        body = json.dumps({"model": cfg.model, "messages": messages, "temperature": 0,
                           "response_format": {"type": "json_object"}}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key}"
        elif cfg.basic_auth:
            token = base64.b64encode(":".join(cfg.basic_auth).encode("utf-8")).decode("ascii")
            headers["Authorization"] = f"Basic {token}"
        last = ""
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                with self._lock:
                    self.stats["retries"] += 1
                time.sleep(cfg.backoff * 2 ** (attempt - 1))
            with self._lock:
                self.stats["requests"] += 1
            req = urllib.request.Request(cfg.endpoint, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=cfg.timeout) as resp:
                    length = resp.headers.get("Content-Length")
                    if length and length.isdigit() and int(length) > cfg.max_response_bytes:
                        raise InvalidAnswer(f"response body of {int(length)} bytes exceeds max_response_bytes="
                                            f"{cfg.max_response_bytes}: not read")
                    raw = resp.read(cfg.max_response_bytes + 1)
                    if len(raw) > cfg.max_response_bytes:
                        raise InvalidAnswer(f"response body exceeds max_response_bytes={cfg.max_response_bytes}: "
                                            f"not read further")
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {cfg.redact(e.reason)}"
                if e.code == 429 or e.code >= 500:
                    log.debug("decompose llm: %s from %s (attempt %d), retrying", last, cfg.endpoint, attempt + 1)
                    continue
                raise LLMError(f"{cfg.endpoint}: {last} (not retried)") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
                last = cfg.redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
                if isinstance(e, TimeoutError) or "timed out" in last:
                    last += f" (timeout {cfg.timeout:g} s)"
                log.debug("decompose llm: %s (attempt %d), retrying", last, attempt + 1)
                continue
            try:
                data = json.loads(raw)
                content = data["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise InvalidAnswer(f"not an OpenAI chat completion: {cfg.redact(raw[:200])}") from None
            if not isinstance(content, str):
                raise InvalidAnswer("message content is not a string")
            return content
        raise LLMError(f"{cfg.endpoint}: gave up after {cfg.max_retries + 1} attempts (last: {last})")

    # ------------------------------------------------------------------------------- decompose
    def decompose(self, findings: object, impression: object) -> tuple[Decomposition | None, str, str]:
        """Decompose one report.

        Returns:
            (decomposition or ``None``, status, message): status ``ok`` (model answered), ``cached``,
            ``invalid`` (answer failed validation) or ``error`` (endpoint failed); ``None`` means the caller
            should fall back to the rules backend.
        """
        f = "" if is_empty_section(findings) else str(findings).strip()
        i = "" if is_empty_section(impression) else str(impression).strip()
        key = cache_key(self.config.model, self.table, f, i, self.anatomy_list)
        cached = self._cache_get(key)
        if cached is not None:
            with self._lock:
                self.stats["cached"] += 1
            return answer_to_decomposition(cached, self.table), "cached", ""
        if self._circuit_open:
            with self._lock:
                self.stats["error"] += 1
            return None, "error", "endpoint disabled after repeated errors"
        answer = None
        for attempt in range(self.config.invalid_retries + 1):
            try:
                content = self._post(build_messages(f, i, self.anatomy_list))
                answer = parse_answer(content, self.table)
                break
            except InvalidAnswer as e:
                with self._lock:
                    self.stats["invalid"] += 1
                    self._consecutive_errors = 0
                    if attempt < self.config.invalid_retries:
                        self.stats["retries"] += 1
                message = self.config.redact(e)
                if attempt < self.config.invalid_retries:
                    log.debug("decompose llm: invalid answer (%s), asking again", message)
                    continue
                tries = self.config.invalid_retries + 1
                return None, "invalid", f"{message} ({tries} answer{'s' if tries > 1 else ''} tried)"
            except LLMError as e:
                with self._lock:
                    self.stats["error"] += 1
                    self._consecutive_errors += 1
                    if self._consecutive_errors >= self.config.max_consecutive_errors and not self._circuit_open:
                        self._circuit_open = True
                        log.error("decompose llm: %d consecutive endpoint failures; using the rules backend for the "
                                  "remaining reports (last: %s)", self._consecutive_errors, self.config.redact(e))
                return None, "error", self.config.redact(e)
        assert answer is not None
        with self._lock:
            self.stats["ok"] += 1
            self._consecutive_errors = 0
            # sentences the model did not copy verbatim (rephrased or invented) are counted, not rejected
            report = normalise_sentence(f"{f} {i}")
            self.stats["not_verbatim"] += sum(
                normalise_sentence(s) not in report
                for e in answer.values() for s in (*e["findings"], *e["impression"]))
        self._cache_put(key, answer)
        return answer_to_decomposition(answer, self.table), "ok", ""
