"""The offline rules backend: sentences -> clauses -> anatomies -> normal/abnormal.

For each sentence of the Findings and Impression sections:

1. **Clauses.** The sentence is cut at hard clause cues (``;``, "but", "however", "whereas", ...) and at
   ``,``/``and`` when both sides carry their own predicate ("The heart is enlarged, the aorta is ectatic").
2. **Anatomies per clause.** Strong lexicon terms name concepts ("lung", "aortic arch", "pericardial");
   weak terms ("segment", "lobe") count only when no strong term is present; when the clause names no
   region at all, finding words imply one ("emphysema" -> lung, "cardiomegaly" -> heart). Concepts map to
   the table's anatomies (:meth:`Lexicon.resolve`); a clause about a region outside the table ("the
   liver") gets no anatomy. A clause with no evidence inherits from its neighbour clause; a sentence with
   none that opens with a pronoun ("It measures 5 mm.") inherits from the previous sentence.
3. **Units.** If all clauses share one anatomy set, the whole sentence is one unit given to each named
   anatomy; otherwise consecutive clauses with equal sets form units (the sentence is split).
4. **Normal / abnormal per clause** (NegEx-style): pseudo-negations ("no significant change") and hedges
   are masked first; an abnormal mention (generic cues such as "thickening", "dilated" and every finding
   word) is negated by a preceding negation cue ("no", "without") or a following one ("was not
   observed") within its scope (scope ends at "but", ";", "which", ... and at commas that close a clause).
   A clause is abnormal if a mention survives or a hedge is present ("?", "cannot be excluded",
   "possible": hedged = abnormal, as radiologists mean it). When all surviving mentions are findings that
   imply specific anatomies of a multi-anatomy clause, only those anatomies are abnormal ("cardiomegaly
   with normal aortic calibre").

Impression units go to ``conc`` only for the anatomies they call abnormal; findings units go to ``desc``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

from fvlm.anatomy import AnatomyTable
from fvlm.decompose.base import Decomposition
from fvlm.decompose.lexicon import Lexicon, Match, TermMatcher, load_lexicon, normalise_for_matching
from fvlm.decompose.sentences import split_sentences

_LEADING = re.compile(r"^(?:[\s,;:.]|and\b|but\b|however\b|whereas\b|while\b|although\b|though\b|also\b)+", re.I)
_TRAILING = re.compile(r"[\s,;:]+$")
_SOFT_SPLIT = re.compile(r",\s*(?:and\s+)?|\s+and\s+", re.I)
_OPENERS = re.compile(r"^\s*(?:and|with|but|a|an|the|also)\s+")


@dataclass
class Unit:
    """A piece of a report (a sentence or a split clause) with its anatomies and their normality."""

    text: str
    anatomies: tuple[str, ...]
    abnormal: dict[str, bool] = field(default_factory=dict)


@dataclass
class _Clause:
    start: int
    end: int
    anatomies: tuple[str, ...] | None  # None = no evidence (inherit); () = about regions outside the table
    abnormal: bool
    specific: set[str] | None


class RulesDecomposer:
    """Decompose reports with the lexicon's rules (no network, deterministic)."""

    def __init__(self, table: AnatomyTable, lexicon: Lexicon | None = None):
        self.table = table
        self.lexicon = lexicon or load_lexicon()
        self.concept_anatomies = self.lexicon.resolve(table)

    # ------------------------------------------------------------------------------------ matchers
    @cached_property
    def _hard_split(self) -> TermMatcher:
        return TermMatcher([(t, "split") for t in self.lexicon.cues["clause_split"]])

    def _has(self, kind: str, text: str) -> bool:
        return bool(self.lexicon.cue_matcher(kind).find(normalise_for_matching(text)))

    # ----------------------------------------------------------------------------------- clauses
    def _split_clauses(self, sentence: str) -> list[tuple[int, int]]:
        """Spans of the clauses of ``sentence`` (character offsets into it)."""
        hard = [0]
        for m in self._hard_split.find(sentence):
            left, right = sentence[hard[-1] : m.start], sentence[m.end :]
            if re.search(r"[A-Za-z]{2}", left) and re.search(r"[A-Za-z]{2}", right):
                hard.append(m.start)
        hard.append(len(sentence))
        spans: list[tuple[int, int]] = []
        for a, b in zip(hard[:-1], hard[1:], strict=True):
            seg_start = a
            for m in _SOFT_SPLIT.finditer(sentence, a, b):
                left, right = sentence[seg_start : m.start()], sentence[m.end() : b]
                if self._has("predicate", left) and self._has("predicate", right):
                    spans.append((seg_start, m.start()))
                    seg_start = m.start()
            spans.append((seg_start, b))
        return spans

    # ------------------------------------------------------------------------------- anatomies
    def _anatomies(self, text: str) -> tuple[str, ...] | None:
        """Table anatomies a clause is about; ``()`` = other regions only; ``None`` = no evidence."""
        lex = self.lexicon
        concepts = [m.label for m in lex.anatomy_matcher.find(text)]
        if not concepts:
            concepts = [m.label for m in lex.weak_matcher.find(text)]
        if not concepts:
            concepts = [m.label for m in lex.finding_matcher.find(text)]
        if not concepts:
            return None
        return self._resolve(concepts)

    def _resolve(self, concepts: list[str] | set[str]) -> tuple[str, ...]:
        hit = {a for c in concepts for a in self.concept_anatomies[c]}
        return tuple(a for a in self.table.names if a in hit)  # table order: deterministic output

    # -------------------------------------------------------------------------- normal/abnormal
    def _boundaries(self, text: str) -> list[int]:
        """Positions where a negation scope ends: scope cues and commas that close a clause."""
        lex = self.lexicon
        cuts = [m.start for m in lex.cue_matcher("scope_end").find(text)]
        commas = [i for i, ch in enumerate(text) if ch == ","]
        prev = 0
        for k, p in enumerate(commas):
            nxt_end = commas[k + 1] if k + 1 < len(commas) else len(text)
            before, after = text[prev:p], _OPENERS.sub("", text[p + 1 : nxt_end])
            opens_new = bool(re.match(r"\s*\d", after)) or any(
                m.start == 0 for m in lex.cue_matcher("severity").find(after.lstrip()))
            if lex.cue_matcher("predicate").find(before) or opens_new:
                cuts.append(p)
                prev = p + 1
        return sorted(cuts)

    def classify(self, clause: str) -> tuple[bool, set[str] | None]:
        """Whether a clause states an abnormality.

        Returns:
            (abnormal, specific): ``specific`` is the set of concepts implied by the surviving mentions
            when all of them are anatomy-specific findings, else ``None`` (the abnormality applies to
            every anatomy of the clause).
        """
        lex = self.lexicon
        text = normalise_for_matching(clause)

        def mask(t: str, matches: list[Match]) -> str:
            for m in matches:
                t = t[: m.start] + " " * (m.end - m.start) + t[m.end :]
            return t

        text = mask(text, lex.cue_matcher("pseudo_negation").find(text))
        hedges = lex.cue_matcher("hedge").find(text)
        text = mask(text, hedges)
        negations = lex.negation_matcher.find(text)
        cuts = self._boundaries(text)
        mentions = lex.abnormal_matcher.find(text)

        def crosses(a: int, b: int) -> bool:
            return any(a <= c < b for c in cuts)

        surviving = []
        for m in mentions:
            negated = any(
                (n.label == "pre" and n.end <= m.start and not crosses(n.end, m.start))
                or (n.label == "post" and n.start >= m.end and not crosses(m.end, n.start))
                for n in negations
            )
            if not negated:
                surviving.append(m)
        abnormal = bool(surviving) or bool(hedges)
        if hedges or any(not m.label for m in surviving):
            return abnormal, None
        return abnormal, {m.label for m in surviving}

    # ------------------------------------------------------------------------------- sentences
    def analyse(self, sentence: str) -> list[Unit]:
        """Split one sentence into units with anatomies and normality (anatomies may be empty)."""
        clauses = []
        for a, b in self._split_clauses(sentence):
            piece = sentence[a:b]
            norm = normalise_for_matching(piece)
            anatomies = self._anatomies(norm)
            abnormal, specific = self.classify(piece)
            clauses.append(_Clause(a, b, anatomies, abnormal, specific))
        # clauses with no evidence inherit from the previous clause (or the next one, for the first)
        known = [c.anatomies for c in clauses if c.anatomies is not None]
        if not known:
            return [Unit(sentence.strip(), (), {})]
        last = known[0]
        for c in clauses:
            if c.anatomies is None:
                c.anatomies = last
            last = c.anatomies
        flags = [self._per_anatomy(c.anatomies, c.abnormal, c.specific) for c in clauses]
        if len({c.anatomies for c in clauses}) == 1:
            merged = {a: any(f[a] for f in flags) for a in clauses[0].anatomies}
            return [Unit(sentence.strip(), clauses[0].anatomies, merged)]
        units: list[Unit] = []
        groups: list[list[int]] = []
        for k, c in enumerate(clauses):
            if groups and clauses[groups[-1][-1]].anatomies == c.anatomies:
                groups[-1].append(k)
            else:
                groups.append([k])
        for g in groups:
            text = _clean_clause(sentence[clauses[g[0]].start : clauses[g[-1]].end])
            if not text:
                continue
            anatomies = clauses[g[0]].anatomies
            merged = {a: any(flags[k][a] for k in g) for a in anatomies}
            units.append(Unit(text, anatomies, merged))
        return units

    def _per_anatomy(self, anatomies: tuple[str, ...], abnormal: bool, specific: set[str] | None) -> dict[str, bool]:
        if not abnormal:
            return {a: False for a in anatomies}
        if specific:
            implied = set(self._resolve(specific)) & set(anatomies)
            if implied:
                return {a: a in implied for a in anatomies}
        return {a: True for a in anatomies}

    def analyse_section(self, text: object) -> list[Unit]:
        """Units of one report section, with pronoun-led sentences inheriting the previous anatomies."""
        units: list[Unit] = []
        prev: tuple[str, ...] = ()
        pronoun = self.lexicon.cue_matcher("pronoun")
        for sentence in split_sentences(text):
            got = self.analyse(sentence)
            if len(got) == 1 and not got[0].anatomies and prev:
                norm = normalise_for_matching(sentence)
                starts = any(m.start == 0 for m in pronoun.find(norm))
                if starts and self._anatomies(norm) is None:
                    abnormal, specific = self.classify(sentence)
                    got = [Unit(got[0].text, prev, self._per_anatomy(prev, abnormal, specific))]
            for u in got:
                if u.anatomies:
                    prev = u.anatomies
            units.extend(got)
        return units

    def decompose(self, findings: object, impression: object) -> Decomposition:
        """Decompose one report (its Findings and Impression section texts)."""
        out = Decomposition()
        for u in self.analyse_section(findings):
            for a in u.anatomies:
                out.findings.setdefault(a, []).append(u.text)
        for u in self.analyse_section(impression):
            for a in u.anatomies:
                if u.abnormal.get(a):
                    out.impression.setdefault(a, []).append(u.text)
        return out


def _clean_clause(text: str) -> str:
    """A clause cut out of a sentence, made to read as a sentence: no leading conjunction, capitalised, final dot."""
    t = _TRAILING.sub("", _LEADING.sub("", text)).strip()
    if not t:
        return ""
    t = t[0].upper() + t[1:]
    if t[-1] not in ".?!":
        t += "."
    return t
