"""The rules backend's lexicon: anatomy concepts, finding words and language cues, all as data.

A lexicon (``lexicon.json`` next to this module, or any JSON file of the same shape) lists *concepts*:
anatomical regions with the words that name them. A concept reaches an anatomy of the anatomy table
(:class:`fvlm.anatomy.AnatomyTable`) by

1. name: the table has an anatomy whose name is one of the concept's ``names``;
2. TotalSegmentator classes: table anatomies that merge any of the concept's ``classes``;
3. ``fallback``: the first fallback concept that resolves (e.g. ``pleura`` -> ``lung`` in the released
   4-anatomy table, where the pleura has no anatomy of its own).

A concept that resolves to nothing is still recognised: a sentence about the liver is *about the liver*
and must not be given to the lung because it also says "nodule". Adding an anatomy to the decomposer is
therefore a data change: add a concept (or give an existing one the table's anatomy name).

Term syntax: lower case words separated by one space; hyphens and slashes count as spaces; a plural
``s``/``es`` is implied; a trailing ``*`` matches any word ending (``atelecta*`` -> atelectasis,
atelectatic). At one position the longest term wins, so ``aortic valve`` (heart) beats ``aortic`` (aorta).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from fvlm.anatomy import AnatomyTable

log = logging.getLogger(__name__)

LEXICON_PATH = Path(__file__).resolve().parent / "lexicon.json"

_CUE_KEYS = ("abnormal", "negation_pre", "negation_post", "pseudo_negation", "hedge", "scope_end", "clause_split",
             "predicate", "severity", "pronoun")
_CONCEPT_KEYS = {"names", "classes", "terms", "weak_terms", "findings", "fallback"}


def normalise_for_matching(text: str) -> str:
    """Lower case; hyphens, slashes and underscores become spaces; ``non``-prefixes are joined.

    ``non-specific`` -> ``nonspecific`` so that the negation cue ``non`` never reaches the next word
    (``non-calcified nodule`` is a nodule). The result is only matched against, never output.
    """
    t = text.lower().replace("’", "'")
    t = re.sub(r"[-/_–—]", " ", t)
    t = re.sub(r"\bnon\s+(?=[a-z])", "non", t)
    return t


_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def _lower_same_length(text: str) -> str:
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)  # e.g. Turkish dotted I


@dataclass(frozen=True)
class Match:
    start: int
    end: int
    label: str


@dataclass(frozen=True)
class _Term:
    words: tuple[str, ...]  # normalised words; a trailing "*" marks a prefix
    label: str
    length: int  # characters of the literal term (longer terms win ties)

    def word_matches(self, k: int, token: str) -> bool:
        w = self.words[k]
        if w.endswith("*"):
            return token.startswith(w[:-1])
        if k == len(self.words) - 1 and w[-1:].isalpha():
            return token in (w, w + "s", w + "es")
        return token == w


class TermMatcher:
    """Finds non-overlapping occurrences of labelled terms, leftmost first; the longest term wins at a position.

    Terms are matched word by word on tokens (runs of letters/digits, or single punctuation characters), with
    an index on the first word, which is much faster than one regular expression with hundreds of alternatives.
    """

    def __init__(self, terms: list[tuple[str, str]]):
        """``terms``: (term, label) pairs; several terms may share a label. Matching ignores case."""
        self._exact: dict[str, list[_Term]] = {}
        self._prefix: dict[str, list[_Term]] = {}  # keyed by the first 3 characters of a prefix first word
        self._short_prefix: list[_Term] = []
        for t, label in sorted(set(terms)):
            # "*" is tokenised as its own punctuation token; glue it back onto the word it ends
            glued: list[str] = []
            for w in _TOKEN.findall(normalise_for_matching(t)):
                if w == "*" and glued:
                    glued[-1] += "*"
                else:
                    glued.append(w)
            if not glued:
                raise ValueError(f"empty lexicon term {t!r}")
            term = _Term(tuple(glued), label, len(t.rstrip("*")))
            first = term.words[0]
            if first.endswith("*"):
                if len(first) - 1 >= 3:
                    self._prefix.setdefault(first[:3], []).append(term)
                else:
                    self._short_prefix.append(term)
            else:
                keys = [first]
                if len(term.words) == 1 and first[-1:].isalpha():
                    keys += [first + "s", first + "es"]
                for key in keys:
                    self._exact.setdefault(key, []).append(term)

    def find(self, text: str) -> list[Match]:
        """Matches in ``text`` (normally passed through :func:`normalise_for_matching` first)."""
        low = _lower_same_length(text)
        tokens = [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(low)]
        out: list[Match] = []
        i = 0
        while i < len(tokens):
            tok = tokens[i][0]
            candidates = self._exact.get(tok, []) + self._prefix.get(tok[:3], []) + self._short_prefix
            best: tuple[int, int, _Term] | None = None
            for term in candidates:
                n = len(term.words)
                if i + n > len(tokens):
                    continue
                if all(term.word_matches(k, tokens[i + k][0]) for k in range(n)):
                    if best is None or (n, term.length) > (best[0], best[1]):
                        best = (n, term.length, term)
            if best is None:
                i += 1
                continue
            n, _, term = best
            out.append(Match(tokens[i][1], tokens[i + n - 1][2], term.label))
            i += n
        return out


@dataclass(frozen=True)
class Concept:
    """An anatomical region of the lexicon (see the module docstring)."""

    name: str
    names: tuple[str, ...]
    classes: tuple[str, ...]
    terms: tuple[str, ...]
    weak_terms: tuple[str, ...]
    findings: tuple[str, ...]
    fallback: tuple[str, ...]


class Lexicon:
    """Concepts + cues loaded from JSON; :meth:`resolve` maps concepts onto an anatomy table."""

    def __init__(self, data: dict, source: str = ""):
        where = f"lexicon {source or data.get('name', '')!r}"
        unknown = set(data) - {"name", "version", "description", "concepts", "cues"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        self.name = str(data.get("name", "custom"))
        self.version = str(data.get("version", "0"))
        self.source = source
        concepts = {}
        for cname, c in data.get("concepts", {}).items():
            bad = set(c) - _CONCEPT_KEYS
            if bad:
                raise ValueError(f"{where}: concept {cname!r}: unknown keys {sorted(bad)}")
            concepts[cname] = Concept(
                name=cname,
                names=tuple(c.get("names", [cname])),
                classes=tuple(c.get("classes", [])),
                terms=tuple(c.get("terms", [])),
                weak_terms=tuple(c.get("weak_terms", [])),
                findings=tuple(c.get("findings", [])),
                fallback=tuple(c.get("fallback", [])),
            )
        owner: dict[tuple[str, str], str] = {}
        for c in concepts.values():
            for f in c.fallback:
                if f not in concepts:
                    raise ValueError(f"{where}: concept {c.name!r} falls back to unknown concept {f!r}")
            # a term listed under two concepts would be assigned arbitrarily: refuse it
            for kind, terms in (("terms", c.terms), ("weak_terms", c.weak_terms), ("findings", c.findings)):
                for t in terms:
                    key = (kind, " ".join(normalise_for_matching(t).split()))
                    if owner.setdefault(key, c.name) != c.name:
                        raise ValueError(f"{where}: {kind[:-1].replace('_', ' ')} {t!r} is listed under both "
                                         f"{owner[key]!r} and {c.name!r}")
        self.concepts: dict[str, Concept] = concepts
        cues = data.get("cues", {})
        missing = [k for k in _CUE_KEYS if k not in cues]
        if missing:
            raise ValueError(f"{where}: cues {missing} missing")
        self.cues: dict[str, tuple[str, ...]] = {k: tuple(cues[k]) for k in _CUE_KEYS}

    # ----------------------------------------------------------------------------------- matchers
    @cached_property
    def anatomy_matcher(self) -> TermMatcher:
        """Strong anatomy terms; labels are concept names."""
        return TermMatcher([(t, c.name) for c in self.concepts.values() for t in c.terms])

    @cached_property
    def weak_matcher(self) -> TermMatcher:
        return TermMatcher([(t, c.name) for c in self.concepts.values() for t in c.weak_terms])

    @cached_property
    def finding_matcher(self) -> TermMatcher:
        """Finding words that imply a concept (labels: concept names)."""
        return TermMatcher([(t, c.name) for c in self.concepts.values() for t in c.findings])

    @cached_property
    def abnormal_matcher(self) -> TermMatcher:
        """Everything that states an abnormality: generic cues (label "") and every concept's findings."""
        pairs = [(t, "") for t in self.cues["abnormal"]]
        pairs += [(t, c.name) for c in self.concepts.values() for t in c.findings]
        return TermMatcher(pairs)

    def cue_matcher(self, kind: str) -> TermMatcher:
        return self._cue_matchers[kind]

    @cached_property
    def _cue_matchers(self) -> dict[str, TermMatcher]:
        return {k: TermMatcher([(t, k) for t in v]) for k, v in self.cues.items()}

    @cached_property
    def negation_matcher(self) -> TermMatcher:
        """Pre- and post-negation cues in one pass (labels ``pre``/``post``; the longer cue wins)."""
        return TermMatcher([(t, "pre") for t in self.cues["negation_pre"]]
                           + [(t, "post") for t in self.cues["negation_post"]])

    # ---------------------------------------------------------------------------------- resolution
    def resolve(self, table: AnatomyTable) -> dict[str, tuple[str, ...]]:
        """Concept name -> the table anatomies it stands for (``()`` = outside the table)."""
        by_name = {n: a.name for a in table.anatomies for n in (a.name, a.name.lower())}

        def direct(c: Concept) -> tuple[str, ...]:
            for n in (c.name, *c.names):
                if n in by_name:
                    return (by_name[n],)
            cls = set(c.classes)
            return tuple(a.name for a in table.anatomies if cls & set(a.classes))

        out: dict[str, tuple[str, ...]] = {}

        def resolve_one(name: str, seen: tuple[str, ...]) -> tuple[str, ...]:
            if name in out:
                return out[name]
            c = self.concepts[name]
            hit = direct(c)
            if not hit:
                for f in c.fallback:
                    if f not in seen:
                        hit = resolve_one(f, (*seen, name))
                        if hit:
                            break
            return hit

        for name in self.concepts:
            out[name] = resolve_one(name, ())
        reached = {a for v in out.values() for a in v}
        for a in table.names:
            if a not in reached:
                log.warning("decompose: anatomy %r of table %r has no lexicon concept (no name, class or fallback "
                            "match): the rules backend will never assign text to it; add a concept to the lexicon",
                            a, table.name)
        return out


def load_lexicon(path: str | Path | None = None) -> Lexicon:
    """Load the shipped lexicon (``None``) or a JSON file of the same shape."""
    p = Path(path) if path else LEXICON_PATH
    if not p.exists():
        raise FileNotFoundError(f"lexicon file {p} not found")
    with open(p) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"lexicon {p}: not valid JSON ({e})") from None
    return Lexicon(data, source=str(p))
