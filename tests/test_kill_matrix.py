"""The short kill matrix (issue 14 item 3): kill -9 of preprocess (main process and a worker) and segment (stand-in
TotalSegmentator) at seeded random moments, then the same command again: no partial file, no orphan, no
temporary left, outputs bit-equal to an uninterrupted run. The full matrix (train and demo too, 20 trials per
command) is benchmarks/kill_matrix.py."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import load_benchmark


@pytest.mark.slow
def test_short_kill_matrix(tmp_path):
    km = load_benchmark("kill_matrix")
    out = tmp_path / "kill_matrix.json"
    rc = km.main(["--trials", "1", "--commands", "preprocess-main,preprocess-worker,segment", "--seed", "1",
                  "--work", str(tmp_path / "work"), "--out", str(out)])
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert set(summary) == {"preprocess-main", "preprocess-worker", "segment"}
    for kind, s in summary.items():
        assert s["trials"] == 1, kind
        assert s["partial_files"] == 0 and s["orphans"] == 0 and s["temporaries_after_rerun"] == 0, (kind, s)
        assert s["reruns_finished"] == 1 and s["equal_to_uninterrupted"] == 1, (kind, result["trials"])
    assert rc == 0
    # the checks can fail: a store whose array differs from the reference is reported
    import numpy as np

    from fvlm.data import store

    ref = tmp_path / "work" / "ref" / "processed"
    other = tmp_path / "other"
    shutil.copytree(ref, other)
    vol = store.open_volume(ref, "valid", store.list_volumes(ref, "valid")[0], mmap=False)
    store.write_volume(other, "valid", vol.name, np.asarray(vol.image) + np.int16(1), np.asarray(vol.mask),
                       {k: v for k, v in vol.meta.items() if k not in ("format", "shape", "storage")})
    problems = km.same_store(other, ref)
    assert f"valid/{vol.name}: arrays differ" in problems
    # meta.json records the arrays' content hashes, so it differs too; no other volume is reported
    assert all(p.startswith(f"valid/{vol.name}: ") for p in problems), problems
