"""Per-anatomy report texts: the released rule that turns findings/impression texts into training texts.

Inputs are the authors' ``desc_info.json`` (findings sentences per scan and anatomy) and
``conc_info.json`` (impression sentences; an anatomy without one is *normal*). Two rules: ``fvlm``
(:func:`anatomy_text`, whitespace-normalised, identity on normalised text) and ``released``
(:func:`released_anatomy_text`, the released CaptionDataset strings exactly; ``data.text_rule``). Texts reach
the loss only as integer ids (:func:`text_id`) and normal flags, never as strings.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

#: the released template for a normal anatomy ("{anatomy} shows no significant abnormalities.")
NORMAL_TEMPLATE = "{anatomy} shows no significant abnormalities."

_STRIP = re.compile(r"[\"'“”‘’()\[\]]")
_SPACE = re.compile(r"\s+")


def clean_text(text: str | None) -> str:
    """Strip quotes and parentheses (as released) and collapse whitespace."""
    if not text:
        return ""
    return _SPACE.sub(" ", _STRIP.sub("", str(text))).strip()


def normal_template(anatomy: str) -> str:
    return NORMAL_TEMPLATE.format(anatomy=anatomy.replace("_", " ").capitalize())


@dataclass(frozen=True)
class AnatomyText:
    """The training text of one anatomy of one scan.

    ``text`` is what the text encoder reads; ``key`` (when set) is the string the identical-text rule compares
    exactly (the released rule compares the raw strings, template included), else ``text`` normalised.
    """

    text: str
    is_normal: bool
    key: str | None = None

    @property
    def id(self) -> int:
        return text_id(self.key, exact=True) if self.key is not None else text_id(self.text)


def anatomy_text(anatomy: str, findings: str | None, impression: str | None) -> AnatomyText:
    """The released rule.

    - abnormal (an impression text exists): impression + " " + findings;
    - normal with findings: the findings text alone (the template prefix is not encoded);
    - normal without findings: the bare template.
    """
    findings, impression = clean_text(findings), clean_text(impression)
    if impression:
        return AnatomyText(f"{impression} {findings}".strip(), is_normal=False)
    if findings:
        return AnatomyText(findings, is_normal=True)
    return AnatomyText(normal_template(anatomy), is_normal=True)


#: the released template, as CaptionDataset writes it (lower-case anatomy name)
RELEASED_TEMPLATE = "{anatomy} shows no significant abnormalities."
_RELEASED_STRIP = str.maketrans("", "", "\"'()")


def released_anatomy_text(anatomy: str, findings: str | None, impression: str | None) -> AnatomyText:
    """The released ``CaptionDataset`` string and what its ``forward()`` encodes.

    ``findings`` / ``impression``: the scan's entries in desc_info.json / conc_info.json, ``None`` where the
    anatomy has no entry. Raw text = impression (or the template ``"{anatomy} shows no significant
    abnormalities."`` when there is none) + findings, each given a full stop when it does not end with one, joined
    without a space, then ``"``, ``'``, ``(`` and ``)`` removed. Normal = the raw text starts with the template.
    Encoded text = the raw text with the template removed (``str.replace``) when it starts with it and is more
    than the template. The identical-text rule compares the raw strings exactly (``key``).
    """
    template = RELEASED_TEMPLATE.format(anatomy=anatomy)
    desc = "" if findings is None else str(findings)
    if findings is not None and not desc.endswith("."):
        desc += "."
    conc = "" if impression is None else str(impression)
    if impression is not None and not conc.endswith("."):
        conc += "."
    if not conc:
        conc = template
    raw = (conc + desc).translate(_RELEASED_STRIP)
    normal = raw.startswith(template)
    encoded = raw.replace(template, "") if normal and raw != template else raw
    return AnatomyText(encoded, is_normal=normal, key=raw)


def text_id(text: str, exact: bool = False) -> int:
    """Stable non-negative int63 id of a text (case and whitespace normalised unless ``exact``).

    Equal ids mean identical texts: the "identical-text" false-negative rule compares these ids, which
    are equal across processes and runs (unlike Python's ``hash``).
    """
    norm = text if exact else _SPACE.sub(" ", text.strip().lower())
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def scan_id(volume_name: str) -> str:
    """``train_12_a_2.nii.gz`` -> ``train_12_a`` (the key of the anatomy-text files)."""
    name = volume_name.removesuffix(".nii.gz").removesuffix(".nii").removesuffix(".npz")
    parts = name.split("_")
    if len(parts) < 4:
        raise ValueError(f"not a CT-RATE volume name (split_patient_scan_reconstruction): {volume_name!r}")
    return "_".join(parts[:-1])


class AnatomyTexts:
    """The anatomy-wise texts of a data set (``desc_info.json`` + ``conc_info.json``)."""

    def __init__(self, desc: dict[str, dict[str, str]], conc: dict[str, dict[str, str]], rule: str = "fvlm"):
        if rule not in ("fvlm", "released"):
            raise ValueError(f"text rule must be 'fvlm' or 'released', got {rule!r}")
        self.desc = desc
        self.conc = conc
        self.rule = rule

    @classmethod
    def load(cls, directory: str | Path, rule: str = "fvlm") -> AnatomyTexts:
        d = Path(directory)
        out = []
        for name in ("desc_info.json", "conc_info.json"):
            p = d / name
            if not p.exists():
                raise FileNotFoundError(f"anatomy texts: {p} not found (expected desc_info.json and conc_info.json)")
            with open(p) as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError(f"{p}: expected {{scan_id: {{anatomy: text}}}}, got {type(data).__name__}")
            out.append(data)
        return cls(*out, rule=rule)

    def has_scan(self, scan: str) -> bool:
        """Whether the scan has texts. Under the released rule every scan does: one missing from both files
        is all-normal (the template for every anatomy), as the released CaptionDataset builds it."""
        return self.rule == "released" or scan in self.desc or scan in self.conc

    def get(self, scan: str, anatomy: str) -> AnatomyText:
        if self.rule == "released":
            return released_anatomy_text(anatomy, self.desc.get(scan, {}).get(anatomy),
                                         self.conc.get(scan, {}).get(anatomy))
        return anatomy_text(anatomy, self.desc.get(scan, {}).get(anatomy), self.conc.get(scan, {}).get(anatomy))
