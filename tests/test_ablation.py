"""The ablation table: means, sds and the seed-paired differences, against hand-computed values."""

from __future__ import annotations

from fvlm.ablation import VARIANTS, ablation_table


def test_table_means_and_paired_differences():
    runs = [{"variant": v, "seed": s, "macro_auc": auc} for v, s, auc in [
        ("global", 0, 0.60), ("global", 1, 0.56),
        ("anatomy", 0, 0.70), ("anatomy", 1, 0.66),
        ("anatomy+normal", 0, 0.72), ("anatomy+normal", 1, 0.69),  # +0.02, +0.03 over anatomy, seed by seed
    ]]
    lines = ablation_table(runs).splitlines()
    assert lines[0].startswith("| variant | runs | macro AUC mean +- sd | paired difference to anatomy")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert list(rows) == [v for v in VARIANTS if v != "anatomy+normal+text"]  # variants without runs are left out
    assert rows["global"] == ["2", "0.580 +- 0.028", "-0.100 +- 0.000", "0.600, 0.560"]
    assert rows["anatomy"] == ["2", "0.680 +- 0.028", "-", "0.700, 0.660"]
    assert rows["anatomy+normal"] == ["2", "0.705 +- 0.021", "+0.025 +- 0.007", "0.720, 0.690"]
