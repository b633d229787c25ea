"""The ablation: tables and paired statistics against hand-computed values, token statistics, and the
completion marker (a checkpoint is not a finished run)."""

from __future__ import annotations

import json

import pytest

from fvlm.recipes.ablation import (
    MARKER,
    RESULT,
    VARIANTS,
    ablation_table,
    choose_max_length,
    finish_run,
    finished_result,
    paired,
    sign_test,
    t_interval,
    token_statistics,
)


def _runs():
    return [{"variant": v, "seed": s, "macro_auc": auc} for v, s, auc in [
        ("global", 0, 0.60), ("global", 1, 0.56),
        ("anatomy", 0, 0.70), ("anatomy", 1, 0.66),
        ("anatomy+normal", 0, 0.72), ("anatomy+normal", 1, 0.69),  # +0.02, +0.03 over anatomy, seed by seed
    ]]


def test_variants_are_the_five_of_the_issue():
    assert list(VARIANTS) == ["global", "anatomy", "anatomy+normal", "anatomy+normal+text",
                              "anatomy+normal+text+coteach"]
    assert "loss.co_teaching=true" in VARIANTS["anatomy+normal+text+coteach"]
    assert all("loss.co_teaching=false" in o for v, o in VARIANTS.items() if not v.endswith("coteach"))


def _section(lines: list[str], title: str) -> list[str]:
    """The table lines (header first) of the section whose title line starts with ``title``."""
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 2
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("Zero-shot macro AUC")), len(lines))
    return lines[start:end]


def test_table_means_and_paired_differences():
    lines = _section(ablation_table(_runs()).splitlines(), "Zero-shot macro AUC, released prompts")
    assert lines[0].startswith("| variant | runs | macro AUC mean +- sd |")
    blank = lines.index("")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:blank]}
    assert list(rows) == ["global", "anatomy", "anatomy+normal"]  # variants without runs are left out
    assert rows["global"] == ["2", "0.580 +- 0.028", "0: 0.600, 1: 0.560"]
    assert rows["anatomy+normal"] == ["2", "0.705 +- 0.021", "0: 0.720, 1: 0.690"]
    comps = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[blank + 3:]
             if line.startswith("|")}
    assert comps["anatomy - global"][:2] == ["2", "+0.100"]
    assert comps["anatomy - global"][3:] == ["2 / 0", "0.500"]
    # +0.02, +0.03: mean 0.025, sd 0.00707, t(0.975, 1) = 12.706 -> half width 0.0635
    assert comps["anatomy+normal - anatomy"][2] == "[-0.039, +0.089]"
    # no run carries the CT-CLIP-prompt metric: no such section
    assert "CT-CLIP prompts" not in ablation_table(_runs())


def test_table_has_a_section_per_prompt_set_over_the_runs_that_have_it():
    runs = _runs()
    runs[0]["macro_auc_ctclip"], runs[2]["macro_auc_ctclip"] = 0.65, 0.68  # global / anatomy, seed 0 only
    lines = _section(ablation_table(runs).splitlines(), "Zero-shot macro AUC, CT-CLIP prompts")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]
            if line.startswith("| ") and not line.startswith("| comparison")}
    assert rows["global"] == ["1", "0.650 +- -", "0: 0.650"] and rows["anatomy"] == ["1", "0.680 +- -", "0: 0.680"]
    assert "anatomy+normal" not in rows
    c = paired(runs, "global", "anatomy", "macro_auc_ctclip")
    assert c["seeds"] == [0] and c["diffs"] == pytest.approx([0.03]) and c["metric"] == "macro_auc_ctclip"


def test_paired_statistics_by_hand():
    c = paired(_runs(), "anatomy", "anatomy+normal")
    assert c["seeds"] == [0, 1] and c["diffs"] == pytest.approx([0.02, 0.03])
    assert c["mean"] == pytest.approx(0.025) and c["wins"] == 2 and c["losses"] == 0
    lo, hi = c["ci95_t"]
    assert lo == pytest.approx(0.025 - 12.7062 * 0.0070711 / 2 ** 0.5, abs=1e-4) and hi == pytest.approx(0.025 * 2 - lo)
    assert paired(_runs(), "anatomy", "anatomy+normal+text") is None


def test_sign_test_and_t_interval():
    assert sign_test([0.1] * 5) == pytest.approx(2 / 32)  # the smallest two-sided p with 5 pairs
    assert sign_test([0.1, 0.1, 0.1, 0.1, -0.1]) == pytest.approx(2 * 6 / 32)
    assert sign_test([0.1, -0.1]) == 1.0 and sign_test([0.0, 0.0]) == 1.0
    lo, hi = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.3027
    assert (lo, hi) == pytest.approx((2 - 4.3027 / 3 ** 0.5, 2 + 4.3027 / 3 ** 0.5), abs=1e-3)


def test_token_statistics_and_max_length():
    lengths = {"report": [150, 232, 300], "lung": [20, 40, 120]}
    st = token_statistics(lengths, [96, 320])
    assert st["report"]["median"] == 232 and st["report"]["max"] == 300
    assert st["report"]["truncated_at_96"] == 1.0 and st["lung"]["truncated_at_96"] == pytest.approx(1 / 3)
    assert st["report"]["truncated_at_320"] == 0.0
    assert choose_max_length(lengths, 512) == 320
    assert choose_max_length({"report": [600]}, 512) == 512


def test_checkpoint_without_marker_is_resumed_and_marker_written_last(tiny_data, tmp_path, monkeypatch):
    import pandas as pd

    from fvlm.checkpoint import latest_checkpoint
    from fvlm.config import load_config
    from fvlm.train import train

    cfg = load_config("tiny", ["train.max_steps=3", "train.ckpt_every=1"])
    run = tmp_path / "anatomy-seed0"
    train(cfg, tiny_data, run, stop_after_steps=1)  # an interrupted run: a checkpoint, no marker
    assert finished_result(run) is None
    labels = pd.read_csv(tiny_data / "labels" / "valid_labels.csv")
    result = finish_run(run, cfg, tiny_data, labels, "anatomy", 0)
    assert latest_checkpoint(run).name == "step_0000003"  # resumed to the end of the schedule, not trusted
    marker = json.loads((run / MARKER).read_text())
    assert marker["produced_by"].startswith("fvlm.recipes.ablation.finish_run") and marker["result"] == RESULT
    assert (run / MARKER).stat().st_mtime_ns >= (run / RESULT).stat().st_mtime_ns
    assert finished_result(run) == result and 0.0 <= result["macro_auc"] <= 1.0
    assert result["text_max_length"] == cfg.model.text.max_length
    # every prompt set scored: the released prompts and CT-CLIP's, per label too
    assert 0.0 <= result["macro_auc_ctclip"] <= 1.0 and set(result["auc_ctclip"]) == set(result["auc"])
    assert (run / "scores_ctclip.csv").is_file() and result["macro_auc_ctclip"] != result["macro_auc"]
    # a result written before a prompt set existed is completed from the run's checkpoint (marker kept)
    older = {k: v for k, v in result.items() if not k.endswith("_ctclip")}
    (run / RESULT).write_text(json.dumps(older))
    assert finished_result(run) == older  # without the data it is returned as stored
    assert finished_result(run, tiny_data, labels) == result
    assert json.loads((run / RESULT).read_text()) == result

    # a finished run is never trained again
    def fail(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("fvlm.recipes.ablation.train", fail)
    assert finish_run(run, cfg, tiny_data, labels, "anatomy", 0) == result
    # without its marker the same directory is not finished (e.g. killed between result and marker)
    (run / MARKER).unlink()
    assert finished_result(run) is None


def test_runs_recorded_by_an_earlier_session_are_reused_only_when_they_match():
    """The ablation spans sessions: a run in the committed results JSON counts as finished when variant, seed
    and text length match, and never otherwise (a run at another text length must be trained again)."""
    from fvlm.recipes.ablation import previous_result

    previous = [{"variant": "global", "seed": 0, "macro_auc": 0.6, "text_max_length": 448},
                {"variant": "anatomy", "seed": 1, "macro_auc": 0.7, "text_max_length": 96}]
    assert previous_result(previous, "global", 0, 448)["macro_auc"] == 0.6
    assert previous_result(previous, "global", 1, 448) is None
    assert previous_result(previous, "anatomy", 1, 448) is None  # measured with truncated texts: redo
    assert previous_result([], "global", 0, 448) is None
