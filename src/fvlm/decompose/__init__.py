"""Report decomposition: free-text CT reports -> anatomy-wise findings (``desc``) and impression (``conc``) texts.

Two backends write the authors' ``desc_info.json`` / ``conc_info.json`` format (``{scan_id: {anatomy: text}}``):

- ``rules`` (default, offline): sentence splitting, a data-driven anatomy lexicon (``lexicon.json``) and
  NegEx-style negation/hedge rules (:mod:`fvlm.decompose.rules`);
- ``llm``: any OpenAI-compatible chat endpoint with a versioned prompt, validation, retries, a disk cache and
  per-report fallback to the rules (:mod:`fvlm.decompose.llm`).

:func:`evaluate_decomposition` scores a decomposition against reference files. See ``docs/decompose.md``.
"""

from fvlm.decompose.base import Decomposition
from fvlm.decompose.evaluate import evaluate_decomposition, format_evaluation
from fvlm.decompose.lexicon import Lexicon, load_lexicon
from fvlm.decompose.llm import PROMPT_VERSION, LLMConfig, LLMDecomposer
from fvlm.decompose.pipeline import (
    DecomposeResult,
    DecomposeSummary,
    decompose_files,
    decompose_reports,
    read_reports,
    write_outputs,
)
from fvlm.decompose.rules import RulesDecomposer, Unit
from fvlm.decompose.sentences import normalise_sentence, split_sentences

__all__ = [
    "PROMPT_VERSION",
    "DecomposeResult",
    "DecomposeSummary",
    "Decomposition",
    "LLMConfig",
    "LLMDecomposer",
    "Lexicon",
    "RulesDecomposer",
    "Unit",
    "decompose_files",
    "decompose_reports",
    "evaluate_decomposition",
    "format_evaluation",
    "load_lexicon",
    "normalise_sentence",
    "read_reports",
    "decompose_files",
    "split_sentences",
    "write_outputs",
]
