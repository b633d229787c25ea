"""``fvlm export RUN OUT``: a run, checkpoint or converted model as a Hugging Face model folder.

The folder is what a checkpoint holds (:mod:`fvlm.checkpoint`), in the layout ``huggingface_hub``'s
``PyTorchModelHubMixin`` reads and writes (``FVLM`` is such a mixin class)::

    OUT/config.json          {"model_type": "fvlm", "cfg": {...}, "num_anatomies": A, ...}
    OUT/model.safetensors    every weight (safetensors only)
    OUT/anatomy_table.json   anatomies, TotalSegmentator classes, zero-shot prompts
    OUT/preprocessing.json   spacing, HU window(s), crops, orientation, anatomy groups
    OUT/text/                tokenizer files + the text encoder's config.json
    OUT/manifest.json        sizes and SHA-256 of the files above (checked on load)
    OUT/README.md            model card: YAML metadata (license, tags, data sets), training data, zero-shot
                             results from ``fvlm metrics --json``, preprocessing, intended use and limits

``fvlm.load(OUT)``, ``FVLM.from_pretrained(OUT)`` and every ``--checkpoint OUT`` load it offline; uploaded
to the Hub (``hf upload org/name OUT``) it loads as ``fvlm.load("org/name")`` from the cache.
The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData

from fvlm import __version__
from fvlm.anatomy import AnatomyTable, alignment
from fvlm.checkpoint import (
    CONFIG,
    FORMAT_VERSION,
    load_model,
    preprocessing_spec,
    write_manifest,
    write_model_files,
)
from fvlm.config import Config
from fvlm.io import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)

CARD = "README.md"
TAGS = ["fvlm", "medical-imaging", "computed-tomography", "chest-ct", "3d", "vision-language", "zero-shot",
        "pytorch_model_hub_mixin"]


def hf_config(cfg: Config, table: AnatomyTable, num_anatomies: int) -> dict[str, Any]:
    """``config.json`` of an exported folder: the mixin's init arguments (``cfg``, ``num_anatomies``) + facts."""
    return {"model_type": "fvlm", "library_name": "fvlm", "format_version": FORMAT_VERSION,
            "fvlm_version": __version__, "num_anatomies": num_anatomies, "anatomies": list(table.names),
            "loss_mode": cfg.loss.mode, "embed_dim": cfg.model.embed_dim, "cfg": cfg.to_dict()}


def save_pretrained_folder(model: torch.nn.Module, folder: Path) -> None:
    """What ``FVLM.save_pretrained`` writes: the model files, the Hub ``config.json`` and the manifest."""
    cfg, table = getattr(model, "cfg", None), getattr(model, "anatomy_table", None)
    if cfg is None or table is None:
        raise ValueError("save_pretrained needs model.cfg and model.anatomy_table (set by fvlm.load / "
                         "FVLM.from_pretrained / fvlm.checkpoint.load_model); for a run use `fvlm export`")
    folder.mkdir(parents=True, exist_ok=True)
    write_model_files(folder, model, cfg, table)
    atomic_write_text(folder / CONFIG, json.dumps(hf_config(cfg, table, model.num_anatomies), indent=2) + "\n")
    write_manifest(folder)


# ----------------------------------------------------------------------------------------------- model card
def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown table of ``fvlm metrics --json`` output: one row per label, then the macro average."""
    keys = [("auc", "AUC"), ("acc", "ACC"), ("f1", "F1"), ("precision", "Precision"), ("sens", "Sensitivity"),
            ("spec", "Specificity")]
    lines = ["| label | " + " | ".join(h for _, h in keys) + " | n | positives |",
             "|---|" + "---:|" * (len(keys) + 2)]
    for label, m in metrics.get("labels", {}).items():
        lines.append(f"| {label} | " + " | ".join(_fmt(m.get(k)) for k, _ in keys)
                     + f" | {m.get('n', '-')} | {m.get('positives', '-')} |")
    macro = metrics.get("macro")
    if macro:
        lines.append(f"| **macro ({macro.get('n_labels', len(metrics.get('labels', {})))} labels)** | "
                     + " | ".join(_fmt(macro.get(k)) for k, _ in keys) + " | | |")
    policy = metrics.get("policy", {})
    if policy:
        lines.append("")
        shown = {k: v for k, v in policy.items() if k != "files" and isinstance(v, (str, int, float, bool))}
        lines.append("Protocol: " + "; ".join(f"{k}: {v}" for k, v in shown.items()))  # no local file paths
    return "\n".join(lines)


def find_metrics(run: Path) -> Path | None:
    """``RUN/metrics.json``, or the demo layout's ``OUT/metrics.json`` beside ``OUT/run``."""
    for p in (run / "metrics.json", run.parent / "metrics.json" if run.name == "run" else None):
        if p is not None and p.is_file():
            return p
    return None


def model_card(cfg: Config, table: AnatomyTable, ckpt: Path, name: str, license: str, training_data: str,
               datasets: list[str], metrics: dict[str, Any] | None, metrics_source: str, text_info: dict[str, Any],
               base_model: str = "") -> str:
    """README.md text with YAML metadata (``huggingface_hub.ModelCardData``) and the sections a reader needs."""
    data = ModelCardData(license=license, library_name="fvlm", tags=list(TAGS), datasets=datasets or None,
                         pipeline_tag="zero-shot-classification", base_model=base_model or None)
    v, t = cfg.model.vision, text_info
    spec = preprocessing_spec(cfg, table)
    step = ckpt.name.split("_")[-1].lstrip("0") if ckpt.name.startswith("step_") else ""
    results = (f"Zero-shot diagnosis ({metrics_source}):\n\n{metrics_table(metrics)}" if metrics else
               "No evaluation was attached to this export (`fvlm export --metrics metrics.json` adds the table of "
               "`fvlm metrics --json`).")
    started = ("random initialisation" if cfg.model.text.random_init
               else Path(cfg.model.text.pretrained).name or cfg.model.text.pretrained)  # no local paths in a card
    rows = [
        ("image encoder", f"3D ViT, width {v.width}, depth {v.depth}, heads {v.heads}, patch (z, y, x) "
                          f"{list(v.patch_size)}, levels {list(v.levels)}"),
        ("text encoder", f"BERT, hidden {t.get('hidden_size')}, layers {t.get('num_hidden_layers')}, vocabulary "
                         f"{t.get('vocab_size')}, pooling {cfg.model.text.pooling}, max length "
                         f"{cfg.model.text.max_length}"),
        ("text model it started from", f"`{started}`"),
        ("embedding", f"{cfg.model.embed_dim}, " + ("one per volume (global baseline)"
                                                    if alignment(cfg, table).whole_crop else "one per anatomy")),
        ("loss", f"{cfg.loss.mode}; normal samples as positives: {cfg.loss.normal_positives}; identical texts as "
                 f"positives: {cfg.loss.same_text_positives}"),
        ("training", (f"{step} optimizer steps, " if step else "") + f"batch {cfg.train.batch_size} per process, "
                     f"lr {cfg.train.lr}"),
    ]
    model_rows = "\n".join(f"| {k} | {val} |" for k, val in rows)
    anatomies = "\n".join(f"| {a.name} | {', '.join(a.classes)} |" for a in table.anatomies)
    body = f"""
# {name}

An anatomy-level vision-language model for 3D chest CT: the fVLM method (Shui et al., *Large-scale and
fine-grained vision-language pre-training for enhanced CT image understanding*, ICLR 2025), trained and
exported with the `fvlm` package {__version__}. Each anatomy of a scan (from a TotalSegmentator label map)
gets its own embedding, matched against anatomy-level report texts; findings are scored zero-shot from
prompt pairs ("X is normal" / "X shows ...").

## Use

```python
import fvlm

predictor = fvlm.load("path/to/this/folder")  # or a Hub id, e.g. fvlm.load("org/name")
prediction = predictor.predict("scan.nii.gz", mask="scan_totalseg.nii.gz")  # HU volume + TotalSegmentator map
print(prediction.top(5))
```

```bash
fvlm predict scan.nii.gz --mask scan_totalseg.nii.gz --checkpoint path/to/this/folder --out findings.json
fvlm eval --checkpoint path/to/this/folder --data processed/ --split valid --out scores.csv
```

Loading needs no network and no other file: the text encoder's architecture and tokenizer are in `text/`.
`FVLM.from_pretrained(...)` (`from fvlm.model import FVLM`) returns the bare `torch.nn.Module`.

## Model

| part | value |
|---|---|
{model_rows}

## Training data

{training_data or 'Not recorded with the run (give it with `fvlm export --training-data`).'}

## Zero-shot results

{results}

## Preprocessing

Scans are reoriented to LPS, resampled to {spec['spacing_xyz_mm']} mm (x, y, z), clipped to the HU window
{spec['hu_window']} and scaled to [0, 1] (input channels: {spec['input_windows']}); each anatomy's crop is its
bounding box plus {spec['margin_zyx_voxels']} voxels (z, y, x), at least {spec['eval_crop_size_zyx']} at evaluation.
`fvlm predict` does all of this from a NIfTI file or DICOM folder; `preprocessing.json` has the full spec.

Anatomy table `{table.name}`:

| anatomy | TotalSegmentator v2 classes |
|---|---|
{anatomies}

## Intended use and limits

- Research on CT vision-language models: zero-shot abnormality scoring, anatomy-level retrieval, feature
  extraction, and as a starting point for fine-tuning. **Not a medical device**; not for diagnosis or any
  clinical decision.
- Trained on chest CT with the acquisition and report conventions of its training data; other body regions,
  contrast phases, paediatric scans, scanners or report languages are out of distribution. Scores are
  uncalibrated similarities, and thresholds fitted on one data set do not carry over to another.
- Needs a TotalSegmentator v2 `total` label map of the scan; anatomies the map lacks are not scored.
- Results on synthetic data (`fvlm synth`, `fvlm demo`) show that the software works, not clinical accuracy.

## Files

`model.safetensors` (weights), `config.json` (configuration), `anatomy_table.json`, `preprocessing.json`,
`text/` (tokenizer, text-encoder architecture), `manifest.json` (sizes and SHA-256, checked on load).

## Citation

```bibtex
@inproceedings{{shui2025fvlm,
  title     = {{Large-scale and Fine-grained Vision-language Pre-training for Enhanced CT Image Understanding}},
  author    = {{Shui, Zhongyi and Zhang, Jianpeng and Cao, Weiwei and Wang, Sinuo and Guo, Ruizhe and Lu, Le and
               Yang, Lin and Ye, Xianghua and Liang, Tingbo and Zhang, Qi and Zhang, Ling}},
  booktitle = {{International Conference on Learning Representations (ICLR)}},
  year      = {{2025}}
}}
```
"""
    text = f"---\n{data.to_yaml()}\n---\n{body}"
    ModelCard(text)  # parses the metadata back: raises on invalid YAML
    return text


# ----------------------------------------------------------------------------------------------- export
def export(run: str | Path, out: str | Path, metrics: str | Path | None = None, training_data: str = "",
           datasets: list[str] | None = None, license: str = "apache-2.0", name: str = "",
           overwrite: bool = False) -> Path:
    """Write the Hugging Face model folder ``out`` for ``run`` (run, checkpoint or converted directory)."""
    run, out = Path(run), Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists: choose another OUT or pass --force to replace it")
    model, cfg, table = load_model(run)  # verifies the checkpoint and that it loads
    ckpt = Path(model.source)
    metrics_path = Path(metrics) if metrics else find_metrics(run)
    metrics_data = None
    if metrics_path is not None:
        try:
            metrics_data = json.loads(Path(metrics_path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{metrics_path}: cannot read the metrics JSON ({e})") from None
        if not isinstance(metrics_data, dict) or "labels" not in metrics_data:
            raise ValueError(f"{metrics_path}: not an `fvlm metrics --json` file (no 'labels')")
        log.info("model card: zero-shot table from %s", metrics_path)
    conversion = ckpt.parent.parent / "conversion.json"
    base_model = ""
    if conversion.is_file():
        base_model = "alibaba-damo-academy/fvlm"  # converted from the authors' released checkpoint
        training_data = training_data or ("CT-RATE (the authors' released fVLM checkpoint, converted with "
                                          "`fvlm convert-official`; see conversion.json)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        write_model_files(tmp, model, cfg, table)
        atomic_write_text(tmp / CONFIG, json.dumps(hf_config(cfg, table, model.num_anatomies), indent=2) + "\n")
        if conversion.is_file():
            shutil.copyfile(conversion, tmp / "conversion.json")
        write_manifest(tmp)
        card = model_card(cfg, table, ckpt, name or out.name, license, training_data, list(datasets or []),
                          metrics_data, str(metrics_path.name) if metrics_path else "",
                          model.text_encoder.config.to_dict(), base_model)
        atomic_write_text(tmp / "README.md", card)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("exported %s -> %s (%.1f MB; load with fvlm.load(%r))", ckpt, out, size / 1e6, str(out))
    return out


__all__ = ["export", "find_metrics", "hf_config", "metrics_table", "model_card", "save_pretrained_folder"]
