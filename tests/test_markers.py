"""Completion markers (fvlm.markers) and their use: train run completion, fvlm demo stages and resume."""

from __future__ import annotations

import json

import pytest

from fvlm.markers import clear_marker, config_hash, is_done, marker_path, read_marker, write_marker


def test_marker_roundtrip_config_hash_and_clear(tmp_path):
    assert not is_done(tmp_path, "stage")
    p = write_marker(tmp_path, "stage", config={"a": 1, "b": [1, 2]}, steps=3)
    rec = json.loads(p.read_text())
    assert rec["stage"] == "stage" and rec["done"] is True and rec["steps"] == 3
    assert rec["config_hash"] == config_hash({"b": [1, 2], "a": 1})  # key order does not matter
    assert {"command", "version", "time", "host", "pid", "id"} <= set(rec)
    assert is_done(tmp_path, "stage") and is_done(tmp_path, "stage", config={"a": 1, "b": [1, 2]})
    assert not is_done(tmp_path, "stage", config={"a": 2, "b": [1, 2]})  # other settings: not done
    assert not is_done(tmp_path, "other")
    clear_marker(tmp_path, "stage")
    assert not is_done(tmp_path, "stage") and read_marker(tmp_path, "stage") is None
    # a truncated or foreign marker never counts as done
    marker_path(tmp_path, "stage").write_text('{"stage": "stage", "do')
    assert not is_done(tmp_path, "stage")
    marker_path(tmp_path, "stage").write_text('{"stage": "another", "done": true}')
    assert not is_done(tmp_path, "stage")
    with pytest.raises(ValueError):
        marker_path(tmp_path, "../x")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temporary


def test_train_writes_marker_only_when_the_schedule_completes(tiny_data, tmp_path):
    from fvlm.config import load_config
    from fvlm.train import train

    cfg = load_config("tiny", ["train.max_steps=2", "train.ckpt_every=1", "train.num_workers=0"])
    run = tmp_path / "run"
    train(cfg, tiny_data, run, stop_after_steps=1)  # interrupted: a checkpoint, but not complete
    assert (run / "checkpoints" / "step_0000001").is_dir()
    assert not is_done(run, "train")
    train(cfg, tiny_data, run, resume=True)
    rec = read_marker(run, "train")
    assert rec is not None and rec["steps"] == 2 and rec["config_hash"] == config_hash(cfg.to_dict())
    assert is_done(run, "train", config=cfg.to_dict())


@pytest.mark.slow
def test_demo_resumes_training_after_a_kill(tmp_path, monkeypatch, capsys):
    """A demo killed during training continues from its last checkpoint instead of deleting the run."""
    import fvlm.recipes.demo
    from fvlm.cli import main

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--config", "tiny", "--train", "4", "--valid", "2", "--workers", "1",
            "--set", "train.max_steps=3", "--set", "train.ckpt_every=1", "--set", "train.num_workers=0"]
    real_train = fvlm.recipes.demo.train

    def killed(*a, **k):  # the job dies after step 2 (checkpoint written, schedule not finished)
        real_train(*a, **{**k, "stop_after_steps": 2})
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(fvlm.recipes.demo, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    capsys.readouterr()
    assert is_done(out / "data", "synth") and is_done(out / "processed", "demo-preprocess")
    assert not is_done(out / "run", "train")
    step2 = out / "run" / "checkpoints" / "step_0000002" / "model.safetensors"
    inode = step2.stat().st_ino
    monkeypatch.setattr(fvlm.recipes.demo, "train", real_train)
    assert main(args) == 0
    text = capsys.readouterr().err  # fvlm's CLI logs to stderr
    assert "continuing the interrupted training" in text and "resumed from" in text
    assert "reusing" in text  # synth and preprocess were not redone
    assert step2.stat().st_ino == inode  # the run was not deleted and retrained from zero
    assert is_done(out / "run", "train") and (out / "run" / "checkpoints" / "step_0000003").is_dir()
    assert is_done(out, "demo") and is_done(out, "eval")
    # a third run reuses every stage
    assert main(args) == 0
    text = capsys.readouterr().err
    assert "reusing the trained run" in text and "resumed from" not in text
    # other data settings into the same --out: refused before anything is touched (no silent mix of data sets)
    other = [a if a != "4" else "5" for a in args]
    assert main(other) == 2
    assert "synthesised with other settings" in capsys.readouterr().err


def test_preprocess_writes_its_marker_last_and_only_when_complete(real_data, tmp_path):
    from fvlm.cli import main

    ct, lab = real_data / "real_ct" / "ct.nii.gz", real_data / "real_ct" / "totalseg_v2.nii.gz"
    cfg = ["--config", "tiny", "--set", "data.spacing=[3.0,3.0,3.0]", "--set", "data.crop_size=[16,32,32]"]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"volume,image,label\na,{ct},{lab}\nb,{tmp_path / 'missing.nii.gz'},{lab}\n")
    out = tmp_path / "out"
    assert main(["preprocess", "--pairs", str(pairs), "--out", str(out), *cfg]) == 1
    assert not is_done(out, "preprocess-pairs")  # a volume failed: the run is not done
    pairs.write_text(f"volume,image,label\na,{ct},{lab}\n")
    assert main(["preprocess", "--pairs", str(pairs), "--out", str(out), *cfg]) == 0
    rec = read_marker(out, "preprocess-pairs")
    assert rec is not None and rec["volumes"] == 1 and rec["skipped"] == 1 and rec["config_hash"]
    newest = max(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "preprocess-pairs.done.json")
    assert marker_path(out, "preprocess-pairs").stat().st_mtime_ns >= newest  # written last
