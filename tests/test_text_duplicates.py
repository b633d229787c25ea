"""benchmarks/text_duplicates.py: the counts behind the ablation's reading of the identical-text rule."""

from __future__ import annotations

import json

import numpy as np
from conftest import load_benchmark


def test_batch_statistics_whole_set_is_exact():
    td = load_benchmark("text_duplicates")
    # batch = the whole set: ids 7,7,7 (3 samples, 3 pairs), 5,5 (2, 1), 9 alone, two normal
    ids = [7, None, 7, 5, 9, 7, None, 5]
    got = td.batch_statistics(ids, batch_size=8, draws=3, rng=np.random.default_rng(0))
    assert got == {"abnormal_with_partner_per_batch": 5.0, "identical_abnormal_pairs_per_batch": 4.0}
    # no abnormal twins: nothing to count
    got = td.batch_statistics([1, 2, None, 3], batch_size=2, draws=50, rng=np.random.default_rng(0))
    assert got == {"abnormal_with_partner_per_batch": 0.0, "identical_abnormal_pairs_per_batch": 0.0}


def test_main_counts_abnormal_twins_per_anatomy(tmp_path):
    td = load_benchmark("text_duplicates")
    data = tmp_path / "processed"
    (data / "texts").mkdir(parents=True)
    (data / "labels").mkdir()
    names = [f"train_{i}_a_1.nii.gz" for i in range(4)]
    (data / "labels" / "train_labels.csv").write_text("VolumeName,Cardiomegaly\n" + "".join(f"{n},0\n" for n in names))
    conc = {"train_0_a": {"aorta": "Aortic calcification."}, "train_1_a": {"aorta": "aortic  calcification."},
            "train_2_a": {"aorta": "Aortic ectasia.", "heart": "Cardiomegaly."}}
    desc = {f"train_{i}_a": {"lung": "Lungs are clear."} for i in range(4)}
    (data / "texts" / "conc_info.json").write_text(json.dumps(conc))
    (data / "texts" / "desc_info.json").write_text(json.dumps(desc))
    out = tmp_path / "dup.json"
    assert td.main(["--data", str(data), "--draws", "10", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    aorta, heart, lung = (result["per_anatomy"][k] for k in ("aorta", "heart", "lung"))
    # case and whitespace are normalised: the first two aorta texts are one text
    assert (aorta["abnormal"], aorta["distinct_abnormal"], aorta["abnormal_with_twin_in_split"]) == (3, 2, 2)
    # batch 16 > 4 volumes: every draw is the whole split
    assert aorta["abnormal_with_partner_per_batch"] == 2.0 and aorta["identical_abnormal_pairs_per_batch"] == 1.0
    assert (heart["abnormal"], heart["abnormal_with_twin_in_split"]) == (1, 0)
    assert lung["abnormal"] == 0  # findings without an impression are normal
    assert result["all_anatomies"]["identical_abnormal_pairs_per_batch"] == 1.0
