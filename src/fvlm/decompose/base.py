"""The result type shared by the decomposition backends."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Decomposition:
    """One report split by anatomy.

    ``findings[a]``: the findings sentences about anatomy ``a`` (normal and abnormal), in report order.
    ``impression[a]``: the ABNORMAL impression sentences about ``a`` (none = the anatomy is normal).
    """

    findings: dict[str, list[str]] = field(default_factory=dict)
    impression: dict[str, list[str]] = field(default_factory=dict)

    def desc(self) -> dict[str, str]:
        """``{anatomy: findings text}`` as in the authors' ``desc_info.json`` (sentences joined by spaces)."""
        return {a: " ".join(s) for a, s in self.findings.items() if s}

    def conc(self) -> dict[str, str]:
        """``{anatomy: impression text}`` as in ``conc_info.json``; only abnormal anatomies appear."""
        return {a: " ".join(s) for a, s in self.impression.items() if s}
