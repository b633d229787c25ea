"""Names that become paths (issue 17 item 1): a split or volume name from a --pairs CSV can never write or delete
outside --out; the store never deletes a directory it did not write."""

from __future__ import annotations

import csv
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from fvlm.cli import main
from fvlm.data import store
from fvlm.data.joblist import pairs_jobs
from fvlm.paths import component_problem, inside, safe_component

CFG = ["--config", "tiny", "--set", "data.spacing=[3.0,3.0,6.0]", "--set", "data.margin=[1,2,2]",
       "--set", "data.crop_size=[8,16,16]"]


@pytest.mark.parametrize("name", ["", ".", "..", "../victim", "/abs/victim", "a/b", "a\\b", ".hidden", ".tmp.x",
                                  " lead", "trail ", "tab\there", "nl\n", "x" * 256])
def test_unsafe_components_are_refused(name):
    assert component_problem(name) is not None
    with pytest.raises(ValueError, match="pairs.csv line 7: split"):
        safe_component(name, "split", "pairs.csv line 7")


@pytest.mark.parametrize("name", ["valid", "valid_1_a_1", "imgtest", "scan 1", "tomodensitométrie", "a..b", "x" * 255])
def test_safe_components_pass_unchanged(name):
    assert safe_component(name, "volume name") == name


def test_store_paths_refuse_unsafe_names(tmp_path):
    with pytest.raises(ValueError, match="split"):
        store.volume_dir(tmp_path, "../x", "v")
    with pytest.raises(ValueError, match="volume name"):
        store.failure_path(tmp_path, "valid", "/etc")
    with pytest.raises(ValueError):
        store.remove_volume(tmp_path, str(tmp_path / "victim"), "keep")
    assert inside(tmp_path / "a" / "b", tmp_path) == tmp_path / "a" / "b"
    with pytest.raises(ValueError, match="outside"):
        inside(tmp_path / "a" / ".." / "..", tmp_path)


def test_store_never_deletes_a_directory_it_did_not_write(tmp_path):
    d = tmp_path / "valid" / "vol"
    d.mkdir(parents=True)
    (d / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="does not write"):
        store.remove_volume(tmp_path, "valid", "vol")
    with pytest.raises(ValueError, match="does not write"):
        store.write_volume(tmp_path, "valid", "vol", np.zeros((2, 2, 2), np.int16), np.zeros((2, 2, 2), np.uint8), {})
    assert (d / "thesis.tex").read_text() == "years of work"
    # a link to somewhere else is not followed either
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "data.txt").write_text("keep")
    (tmp_path / "valid" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="link"):
        store.remove_volume(tmp_path, "valid", "link")
    assert (tmp_path / "elsewhere" / "data.txt").read_text() == "keep"


def _victims(tmp_path: Path) -> tuple[Path, Path]:
    abs_victim = tmp_path / "abs_victim"
    rel_victim = tmp_path / "rel_victim"
    for v in (abs_victim, rel_victim):
        (v / "keep").mkdir(parents=True)
        (v / "keep" / "data.txt").write_text("precious")
    return abs_victim, rel_victim


def _pairs(tmp_path: Path, real_data: Path, abs_victim: Path) -> Path:
    """Two hostile rows (the issue's exact reproduction) and one good one, in a CSV two levels below tmp_path
    so that ``../../rel_victim`` from --out points at ``tmp_path/rel_victim``."""
    pairs = tmp_path / "in" / "pairs.csv"
    pairs.parent.mkdir()
    ct, lab = real_data / "real_ct" / "ct.nii.gz", real_data / "real_ct" / "totalseg_v2.nii.gz"
    pairs.write_text("volume,image,label,split\n"
                     f"keep,missing.nii.gz,x.nii.gz,{abs_victim}\n"
                     "keep,missing.nii.gz,x.nii.gz,../../rel_victim\n"
                     f"good,{ct},{lab},valid\n")
    return pairs


def test_pairs_csv_split_traversal_is_refused_by_preprocess(tmp_path, real_data):
    abs_victim, rel_victim = _victims(tmp_path)
    pairs = _pairs(tmp_path, real_data, abs_victim)
    rejected = []
    assert [j.volume for j in pairs_jobs(pairs, rejected=rejected)] == ["good"]
    assert [(r.line, r.split) for r in rejected] == [(2, str(abs_victim)), (3, "../../rel_victim")]
    with pytest.raises(ValueError, match=r"pairs.csv line 2: split .* path separator"):
        pairs_jobs(pairs)

    out = tmp_path / "a" / "out"
    rc = main(["preprocess", "--pairs", str(pairs), "--out", str(out), *CFG, "--set", "data.spacing=[6.0,6.0,6.0]"])
    assert rc == 1  # the good row is processed, the hostile ones reported
    for v in (abs_victim, rel_victim):
        assert (v / "keep" / "data.txt").read_text() == "precious"
        assert sorted(p.name for p in v.iterdir()) == ["keep"]  # nothing written there either
    assert store.is_complete(out, "valid", "good")
    with open(out / "failures.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["split"] for r in rows} == {str(abs_victim), "../../rel_victim"}
    assert all(r["volume"] == "keep" and "becomes part of an output path" in r["error"] for r in rows)
    m = store.read_manifest(out)
    assert sorted(m["status"]) == ["failed", "failed", "ok"]
    # a rerun with the CSV fixed clears the refused rows
    pairs.write_text("volume,image,label,split\n" + pairs.read_text().splitlines()[-1] + "\n")
    assert main(["preprocess", "--pairs", str(pairs), "--out", str(out), *CFG,
                 "--set", "data.spacing=[6.0,6.0,6.0]"]) == 0
    assert (out / "failures.csv").read_text().strip() == "split,volume,error"


STANDIN = """#!{python}
import sys
args = sys.argv[1:]
open(args[args.index("-o") + 1], "wb").write(b"not a label map")
"""


def test_pairs_csv_split_traversal_is_refused_by_segment(tmp_path, real_data):
    abs_victim, rel_victim = _victims(tmp_path)
    pairs = _pairs(tmp_path, real_data, abs_victim)
    # the good row's label goes to a new folder; the hostile rows' labels would be next to the CSV
    pairs.write_text(pairs.read_text().replace(str(real_data / "real_ct" / "totalseg_v2.nii.gz"),
                                               str(tmp_path / "maps" / "good.nii.gz")))
    exe = tmp_path / "TotalSegmentator"
    exe.write_text(STANDIN.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    rc = main(["segment", "--pairs", str(pairs), "--totalseg-cmd", str(exe)])
    assert rc == 1
    for v in (abs_victim, rel_victim):
        assert (v / "keep" / "data.txt").read_text() == "precious"
        assert sorted(p.name for p in v.iterdir()) == ["keep"]
    with open(tmp_path / "in" / "pairs_segment_failures.csv", newline="") as f:
        rows = {r["split"]: r["error"] for r in csv.DictReader(f)}
    assert "becomes part of an output path" in rows[str(abs_victim)]
    assert "becomes part of an output path" in rows["../../rel_victim"]
    assert "valid" in rows  # the good row ran (the stand-in writes garbage: refused, reported)
    assert not (tmp_path / "maps" / "good.nii.gz").exists()


def test_segment_never_overwrites_its_input(tmp_path, real_data):
    img = tmp_path / "scan.nii.gz"
    img.write_bytes((real_data / "real_ct" / "ct.nii.gz").read_bytes())
    before = img.read_bytes()
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"volume,image,label\nscan,{img},{img}\n")
    exe = tmp_path / "TotalSegmentator"
    exe.write_text(STANDIN.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    assert main(["segment", "--pairs", str(pairs), "--totalseg-cmd", str(exe)]) == 1
    assert img.read_bytes() == before
    assert "is the image itself" in (tmp_path / "pairs_segment_failures.csv").read_text()
