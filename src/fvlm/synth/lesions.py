"""Abnormalities: one visible signature per CT-RATE label, with a severity drawn per finding.

All signature parameters live in one table, :data:`SIGNATURES` (one :class:`Signature` per label). Every
range is written ``(subtle, strong)``: a finding's severity ``s`` in [0, 1] interpolates between the two
ends, so a subtle finding is small and faint and a strong one large and dense. Severities are drawn from
``Beta(1 + 2 (1 - d), 1 + 2 d)`` where ``d`` is the single ``difficulty`` knob (0 = mostly strong findings,
1 = mostly subtle; default :data:`DEFAULT_DIFFICULTY`).

:func:`sample_findings` turns a scan's 18-label vector into :class:`Finding` objects: anatomy changes
(a larger heart, a pericardial rim, a hiatal hernia, elevated diaphragm, thick or dilated bronchi) and
lesions (objects with a painting ``stage`` and ``render(slab, anatomy)``) placed in the right anatomy
using a coarse label map of the patient. Each finding also records what the report says about it
(``details``) and which lobes or structures it involves.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fvlm.labels import CT_RATE_LABELS
from fvlm.synth.findings import ANATOMY_SAMPLERS, Finding, FindingContext, atelectasis_lesions, bronchiectasis_cysts
from fvlm.synth.lesion_findings import LESION_SAMPLERS
from fvlm.synth.phantom import Anatomy
from fvlm.synth.signatures import DEFAULT_DIFFICULTY, SIGNATURES, draw_severity
from fvlm.synth.tree import build_tree, coarse_map

# every label has a sampler: anatomy-changing ones (run before the coarse map is drawn), then lesion ones
assert set(ANATOMY_SAMPLERS) | set(LESION_SAMPLERS) == set(CT_RATE_LABELS)


def label_rng(entropy, key: tuple[int, ...], label: str) -> np.random.Generator:
    """An independent stream per label, so adding one finding leaves the others unchanged."""
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(*key, CT_RATE_LABELS.index(label))))


def sample_findings(entropy, key: tuple[int, ...], labels: dict[str, int], an: Anatomy,
                    difficulty: float = DEFAULT_DIFFICULTY, tree_rng: np.random.Generator | None = None,
                    coarse_step: float = 6.0) -> tuple[Anatomy, list[Finding]]:
    """Findings for the positive labels; returns the (changed) anatomy, with its vessel tree, and findings.

    ``entropy`` and ``key`` seed one stream per label (see :func:`label_rng`).
    """
    ctx = FindingContext(an, None, difficulty)
    findings: dict[str, Finding] = {}
    sev: dict[str, float] = {}
    rngs: dict[str, np.random.Generator] = {}
    for label in CT_RATE_LABELS:
        if labels.get(label):
            rngs[label] = label_rng(entropy, key, label)
            sev[label] = draw_severity(rngs[label], difficulty)
    for label, fn in ANATOMY_SAMPLERS.items():
        if label in rngs:
            findings[label] = fn(rngs[label], sev[label], SIGNATURES[label], ctx)
    ctx.cmap = coarse_map(ctx.an, coarse_step)
    tree = build_tree(tree_rng if tree_rng is not None else np.random.default_rng(0), ctx.an, ctx.cmap)
    ctx.an = replace(ctx.an, tree=tree)
    if "Atelectasis" in findings:
        atelectasis_lesions(findings["Atelectasis"], rngs["Atelectasis"], SIGNATURES["Atelectasis"], ctx)
    if "Bronchiectasis" in findings:
        bronchiectasis_cysts(findings["Bronchiectasis"], rngs["Bronchiectasis"], SIGNATURES["Bronchiectasis"], ctx)
    for label, fn in LESION_SAMPLERS.items():
        if label in rngs:
            findings[label] = fn(rngs[label], sev[label], SIGNATURES[label], ctx)
    ordered = [findings[label] for label in CT_RATE_LABELS if label in findings]
    return ctx.an, ordered
