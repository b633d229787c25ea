"""Sentence splitting and normalisation for radiology report text.

The splitter cuts at ``.``, ``?``, ``!`` and line breaks between items, but not inside decimals
(``3.5 mm``), abbreviations (``approx.``, ``e.g.``, ``i.e.``, ``vs.``, ``St.``, ``No. 7``), initialisms
(``U.S.``) or before a lower-case continuation. ``?`` stays with its sentence (it is a hedge cue).
Enumeration markers of impressions (``1.``, ``2-``, ``3)``) are removed.
"""

from __future__ import annotations

import re

#: values that mean "this report section is empty" in CT-RATE
EMPTY_SECTION = {"", "not given.", "not given", "nan", "none", "n/a", "-"}

# abbreviations after which "." never ends a sentence (lower case, without the final dot)
_ABBREVIATIONS = {
    "approx", "appr", "e.g", "eg", "i.e", "ie", "vs", "v", "st", "dr", "mr", "mrs", "ms", "prof",
    "fig", "figs", "cf", "ca", "incl", "max", "min", "diam", "ant", "post", "sup", "inf", "lat", "rt", "lt", "resp",
    "ref", "img", "ser", "sect", "seg", "segm", "hr", "mo", "yr", "yrs", "wk", "wks", "et al", "al", "nr",
}  # fmt: skip
# abbreviations that never end a sentence only when a number follows ("No. 7", "Img. 45")
_BEFORE_NUMBER = {"no", "nos", "nr", "img", "image", "ser", "series", "sl", "slice", "seg"}

_LIST_MARKER = re.compile(r"^\s*(?:\(?\d{1,2}[.)\-]|[-*\u2022])\s+(?=\S)")
_SPACE = re.compile(r"\s+")
_WORD_BEFORE = re.compile(r"([A-Za-z][A-Za-z.]*)$")
_NORM_DROP = re.compile(r"[\"'“”‘’()\[\]{}]")
_NORM_PUNCT = re.compile(r"(?<!\d)[.,](?!\d)|[;:!?/\\\-–—_*]")


def is_empty_section(text: object) -> bool:
    """True for missing values and CT-RATE's "Not given." markers."""
    if text is None:
        return True
    if isinstance(text, float) and text != text:  # NaN from pandas
        return True
    return str(text).strip().lower() in EMPTY_SECTION


def _is_boundary(text: str, i: int) -> bool:
    """Whether the '.' at ``text[i]`` ends a sentence."""
    before = text[:i]
    after = text[i + 1 :]
    nxt = after.lstrip()
    if not nxt:
        return True
    # decimals "3.5" and version-like numbers
    if before[-1:].isdigit() and after[:1].isdigit():
        return False
    # "..." or ".," or ".)" continue the sentence
    if nxt[0] in ",;:)]" or after[:1] == ".":
        return False
    m = _WORD_BEFORE.search(before)
    word = m.group(1).lower() if m else ""
    if word in _ABBREVIATIONS or word.rstrip(".") in _ABBREVIATIONS:
        return False
    if word in _BEFORE_NUMBER and nxt[0].isdigit():
        return False
    # initialisms such as "U.S." / "e.g." (single letters separated by dots)
    if re.fullmatch(r"(?:[a-z]\.)*[a-z]", word) and len(word) > 1:
        return False
    # a lower-case continuation ("... mm. in size") is not a new sentence
    if nxt[0].islower():
        return False
    return True


def split_sentences(text: object) -> list[str]:
    """Split one report section into sentences (whitespace collapsed, empty pieces dropped).

    Args:
        text: the section text (``None``/NaN/"Not given." give ``[]``).
    Returns:
        the sentences in order; each keeps its final ``.``/``?``/``!``.
    """
    if is_empty_section(text):
        return []
    out: list[str] = []
    # line breaks separate items when the next line starts a new item (upper case, number, bullet)
    lines = re.split(r"\r?\n+", str(text))
    blocks: list[str] = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if blocks and not _LIST_MARKER.match(line) and line[:1].islower():
            blocks[-1] += " " + line
        else:
            blocks.append(line)
    for block in blocks:
        block = _SPACE.sub(" ", block)
        start = 0
        for i, ch in enumerate(block):
            if ch == "." and re.fullmatch(r"\s*\(?\d{1,2}", block[start:i]):
                continue  # an enumeration marker "2." opens the next item, it does not end one
            if ch in "?!" or (ch == "." and _is_boundary(block, i)):
                # keep runs of terminators ("?.", "...") together
                if i + 1 < len(block) and block[i + 1] in ".?!":
                    continue
                out.append(block[start : i + 1])
                start = i + 1
        out.append(block[start:])
    sentences = []
    for s in out:
        s = _LIST_MARKER.sub("", s.strip()).strip()
        if s and re.search(r"[A-Za-z]", s):
            sentences.append(s)
        elif s and sentences:
            sentences[-1] += " " + s  # e.g. a stray "?" or a bare number
    return sentences


def normalise_sentence(text: str) -> str:
    """Comparison key of a sentence: lower case, quotes/brackets/punctuation removed, whitespace collapsed.

    Decimal points and commas inside numbers are kept ("3.5 mm" stays distinct from "35 mm").
    """
    t = _NORM_DROP.sub(" ", text.lower())
    t = _NORM_PUNCT.sub(" ", t)
    return _SPACE.sub(" ", t).strip()
