"""fvlm decompose: free-text reports -> anatomy-wise findings/impression texts (and their evaluation)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

NAME = "decompose"
HELP = "split free-text reports into anatomy-wise findings/impression texts"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP)
    p.add_argument("--reports", help="CT-RATE-format reports CSV (repeatable via comma)")
    p.add_argument("--out", help="output directory for desc_info.json and conc_info.json")
    p.add_argument("--anatomies", default="released", help="anatomy table (name or JSON path)")
    p.add_argument("--backend", choices=["rules", "llm"], default="rules")
    p.add_argument("--llm-url", default=os.environ.get("FVLM_LLM_URL", ""),
                   help="OpenAI-compatible base URL (env FVLM_LLM_URL)")
    p.add_argument("--llm-model", default=os.environ.get("FVLM_LLM_MODEL", ""), help="model name (env FVLM_LLM_MODEL)")
    p.add_argument("--llm-cache", default="", help="cache directory for LLM answers (default: OUT/.llm_cache)")
    p.add_argument("--llm-workers", type=int, default=4, help="concurrent LLM requests")
    p.add_argument("--llm-timeout", type=float, default=None, help="seconds per LLM request attempt (default 60)")
    p.add_argument("--llm-retries", dest="llm_max_retries", type=int, default=None,
                   help="retries after a timeout, connection error, HTTP 429 or 5xx (default 2)")
    p.add_argument("--llm-invalid-retries", type=int, default=None,
                   help="further requests after an invalid (garbage or partial JSON) answer (default 1)")
    p.add_argument("--llm-accept-fallback", action="store_true",
                   help="exit 0 even when the LLM was never used (every report fell back to the rules backend)")
    p.add_argument("--lexicon", default="", help="rules backend lexicon JSON (default: the shipped chest-CT lexicon)")
    p.add_argument("--evaluate", metavar="GOLD_DIR", help="compare OUT (or --pred) with reference JSON files")
    p.add_argument("--pred", help="with --evaluate: directory of predicted JSON files (default: --out)")
    return p


def run(args: argparse.Namespace) -> int:
    # library imported here, not at the top: `fvlm --help` imports every command module, and the library pulls in
    # pandas (~0.3 s measured) which a parser must not pay
    from fvlm.decompose import LLMConfig, decompose_files

    llm = None
    if args.backend == "llm" and args.reports and args.out:
        extra = {k: getattr(args, f"llm_{k}") for k in ("timeout", "max_retries", "invalid_retries")
                 if getattr(args, f"llm_{k}") is not None}
        llm = LLMConfig(url=args.llm_url, model=args.llm_model,
                        cache_dir=args.llm_cache or Path(args.out) / ".llm_cache", workers=args.llm_workers or 4,
                        **extra)
    result = decompose_files(args.reports, args.out, args.anatomies, args.backend, lexicon=args.lexicon or None,
                             llm=llm, accept_fallback=args.llm_accept_fallback, gold=args.evaluate, pred=args.pred)
    return 0 if result.ok else 1
