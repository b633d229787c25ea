"""Recipes: whole workflows written as plain library calls (no command line inside).

- :mod:`fvlm.recipes.demo`: synthesise -> preprocess -> train -> zero-shot eval -> embed + retrieval -> metrics
  (``fvlm demo``, ``make demo``);
- :mod:`fvlm.recipes.ablation`: the false-negative-reduction ablation (``fvlm demo --ablation``,
  ``benchmarks/ablation.py``).
"""
