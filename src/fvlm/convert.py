"""``fvlm convert-official``: the authors' released fVLM checkpoint (LAVIS format) -> an fvlm run directory.

The released file is a torch file holding ``{"model": state_dict, ...}`` (LAVIS also stores ``optimizer``,
``config``, ``scaler``, ``epoch``; those are reported and dropped). Its model keys and what becomes of them:

============================================  ================================================================
released                                      fvlm
============================================  ================================================================
``visual_encoder.*`` (MONAI 3D ViT)            same names (``patch_embedding.*``, ``blocks.{i}.*``, ``norm``)
``text_encoder.bert.*`` or ``text_encoder.*``  ``text_encoder.*`` (HF BertModel without pooler)
``text_proj.*``, ``vision_projs.{k}.*``        same
``query_tokens`` (A, W) or (1, A, W)           ``query_tokens`` (1, A, W)
``attention.*`` (nn.MultiheadAttention)        same
``temp`` () or (1,)                            ``temp`` ()
anything else (pooler, MLM heads, cross-       listed as *unmapped* in the report, not loaded
attention layers, ``module.`` prefixes are
stripped first)
============================================  ================================================================

Every model tensor must come from the file (``ValueError`` naming the missing keys otherwise), with one
exception: LAVIS drops parameters that had ``requires_grad=False`` when it saves, so text-encoder tensors
that a frozen layer never changed may be absent; they are then taken from ``--text-model`` (the pretrained
CXR-BERT they were frozen at) and listed in the report.

The text encoder's architecture is read from the checkpoint's shapes (vocabulary, width, layers, MLP size,
positions; attention heads from ``--text-model``'s config.json, else the config, else width / 64), so the run
rebuilds exactly that BERT (``model.text.random_init``) with the tokenizer of ``--tokenizer`` / ``--text-model``
and then loads the converted weights: the run never depends on the pretrained text weights again.

Output: ``RUN/checkpoints/step_{epoch}/`` (``model.safetensors``, ``config.json``, ``anatomy_table.json``),
``RUN/config.json``, ``RUN/anatomy_table.json`` and ``RUN/conversion.json`` (source, hash, every renamed,
reshaped, unmapped and filled key).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from transformers import BertModel

from fvlm.anatomy import AnatomyTable, alignment, load_anatomy_table
from fvlm.checkpoint import save_checkpoint
from fvlm.config import Config, load_config
from fvlm.data import store
from fvlm.data.prepare import bounding_box, count_values
from fvlm.hub import quiet_transformers
from fvlm.io import atomic_write_text, file_sha256
from fvlm.model.fvlm import FVLM
from fvlm.model.text_encoder import resolve_text_path
from fvlm.official_state import (
    config_differences,
    infer_text_config,
    infer_vision_fields,
    load_official_state,
    map_official_keys,
    read_lavis_config,
    strip_module,
)

log = logging.getLogger(__name__)

def _text_model_fields(text_model: str) -> dict[str, Any]:
    """The BertConfig fields of a local text model's config.json."""
    with open(resolve_text_path(text_model) / "config.json") as f:
        return json.load(f)


def _resolved(spec: str) -> str:
    """An absolute path for a directory (the run must work from any working directory); builtin names as is."""
    return spec if spec.startswith("builtin:") else str(Path(spec).expanduser().resolve())



def build_config(config: str | Path, overrides: Sequence[str] | None, text_model: str, tokenizer: str,
                 text_fields: dict[str, Any]) -> Config:
    """The run's configuration: the preset (paper_released by default) with vision init off and the text encoder
    set to the checkpoint's architecture, tokenised by ``tokenizer`` (or ``text_model``)."""
    cfg = load_config(config, list(overrides or []))
    tok = tokenizer or text_model
    if not tok:
        tok = cfg.model.text.tokenizer or cfg.model.text.pretrained
        try:
            resolve_text_path(tok)
        except (FileNotFoundError, ValueError, ImportError) as e:
            raise FileNotFoundError(f"the converted run needs the tokenizer of the checkpoint's text model: pass "
                                    f"--text-model DIR (local BiomedVLP-CXR-BERT-specialized) or --tokenizer DIR ({e})"
                                    ) from None
    cfg.model.vision.pretrained = ""
    cfg.model.text.random_init = dict(text_fields)
    cfg.model.text.tokenizer = _resolved(tok)
    cfg.model.text.pretrained = _resolved(text_model or tok)
    cfg.model.text.num_layers = 0
    return cfg.validate()


def convert_official(ckpt: str | Path, out: str | Path, text_model: str = "", tokenizer: str = "",
                     anatomy_table: str | Path = "released", config: str | Path = "paper_released",
                     overrides: Sequence[str] | None = None, trust_pickle: bool = False,
                     model_config: str | Path = "") -> dict[str, Any]:
    """Convert the released checkpoint ``ckpt`` into the run directory ``out``; returns the report.

    Raises ``ValueError`` naming the keys when model tensors are missing or shapes disagree with the config
    (pick the preset of the checkpoint with ``config`` / ``overrides``), ``FileNotFoundError`` for missing inputs.
    """
    ckpt = Path(ckpt)
    raw, info = load_official_state(ckpt, trust_pickle)
    raw = strip_module(raw)
    table: AnatomyTable = load_anatomy_table(anatomy_table)

    # the text architecture from the file (after the bert. prefix is gone), heads from the text model / config
    text_keys = {("text_encoder." + k[len("text_encoder.bert."):]) if k.startswith("text_encoder.bert.") else k: v
                 for k, v in raw.items() if k.startswith("text_encoder.")}
    preset = load_config(config, list(overrides or []))
    extra = _text_model_fields(text_model) if text_model else {}
    heads = extra.get("num_attention_heads") or (preset.model.text.random_init or {}).get("num_attention_heads")
    fields = infer_text_config(text_keys, heads, fallback=extra)
    # the vision sizes from the tensors (heads: the LAVIS config's vit_num_heads, else the preset's when the width
    # is the preset's, else width / 64); the user's --set still wins and config_differences checks the result
    lavis = read_lavis_config(model_config) if model_config else {}
    vheads = lavis.get("vit_num_heads")
    vision = infer_vision_fields(raw, vheads or (preset.model.vision.heads if raw.get("visual_encoder.norm.weight")
                                                 is not None and raw["visual_encoder.norm.weight"].shape[0]
                                                 == preset.model.vision.width else None))
    derived = [f"model.vision.{k}={json.dumps(v)}" for k, v in vision.items()]
    if "max_txt_len" in lavis:
        derived.append(f"model.text.max_length={int(lavis['max_txt_len'])}")
    if "text_proj.weight" in raw:
        derived.append(f"model.embed_dim={int(raw['text_proj.weight'].shape[0])}")
    for k, key in {"vit_hidden_size": "width", "vit_num_layers": "depth", "vit_mlp_dim": "mlp_dim"}.items():
        if k in lavis and vision.get(key) is not None and int(lavis[k]) != vision[key]:
            raise ValueError(f"{model_config}: {k}={lavis[k]} but the checkpoint's tensors say {vision[key]}")
    overrides = derived + list(overrides or [])
    try:
        cfg = build_config(config, overrides, text_model, tokenizer, fields)
    except ValueError as e:
        raise ValueError(f"{ckpt} does not fit the {config} config with the sizes its tensors have ({derived}): {e}; "
                         f"choose the checkpoint's preset with --config/--set") from None

    n_anatomies = len(alignment(cfg, table).table)
    diffs = config_differences(raw, cfg, n_anatomies)
    if diffs:
        raise ValueError(f"{ckpt} does not fit the {config} config with {n_anatomies} anatomies (table "
                         f"{table.name!r}): {'; '.join(diffs)}; choose the checkpoint's preset with --config/--set "
                         f"or its table with --anatomy-table")
    model = FVLM(cfg, num_anatomies=n_anatomies)
    target = model.state_dict()
    mapped, report = map_official_keys(raw, target)
    if report["shape_mismatch"]:
        raise ValueError(f"{ckpt}: {len(report['shape_mismatch'])} tensor(s) do not fit the {config} config with "
                         f"{n_anatomies} anatomies (table {table.name!r}): {report['shape_mismatch'][:6]}; choose the "
                         f"checkpoint's preset with --config/--set or its table with --anatomy-table")
    missing = sorted(k for k in target if k not in mapped)
    filled: list[str] = []
    text_missing = [k for k in missing if k.startswith("text_encoder.")]
    if text_missing and text_model and len(text_missing) == len(missing):
        # frozen text parameters LAVIS did not save: they still hold the pretrained values
        with quiet_transformers():  # transformers' load-report table means nothing here: we pick tensors below
            pretrained = BertModel.from_pretrained(resolve_text_path(text_model), add_pooling_layer=False,
                                                   local_files_only=True).state_dict()
        for k in text_missing:
            src = pretrained.get(k[len("text_encoder."):])
            if src is not None and tuple(src.shape) == tuple(target[k].shape):
                mapped[k] = src.to(target[k].dtype).clone()
                filled.append(k)
        missing = sorted(k for k in target if k not in mapped)
        log.warning("%d text-encoder tensor(s) absent from %s were taken from the pretrained text model %s "
                    "(LAVIS does not save frozen parameters): %s", len(filled), ckpt, text_model, filled[:5])
    if missing:
        hint = (" (text-encoder tensors: pass --text-model with the pretrained CXR-BERT if they were frozen during "
                "training)" if any(k.startswith("text_encoder.") for k in missing) and not text_model else "")
        raise ValueError(f"{ckpt}: {len(missing)} model tensor(s) missing from the checkpoint{hint}: {missing[:10]}")
    model.load_state_dict(mapped, strict=True)
    if len(model.tokenizer) != fields["vocab_size"]:
        # LAVIS's BLIP tokenizer adds [DEC] and [ENC] to bert-base-uncased (30524 rows); a tokenizer of another
        # size is not necessarily wrong, but a different vocabulary would silently give meaningless text features
        log.warning("the checkpoint's text vocabulary has %d rows, the tokenizer %s has %d tokens: make sure it is "
                    "the tokenizer the checkpoint was trained with", fields["vocab_size"], cfg.model.text.tokenizer,
                    len(model.tokenizer))

    out = Path(out)
    step = int(info["epoch"]) if info["epoch"] is not None else 0
    ckpt_dir = save_checkpoint(out, step, model, cfg, table)
    cfg.save(out / "config.json")
    atomic_write_text(out / "anatomy_table.json", json.dumps(table.to_dict(), indent=2) + "\n")
    result = {
        "source": str(ckpt.resolve()),
        "source_bytes": ckpt.stat().st_size,
        "source_sha256": file_sha256(ckpt),
        "checkpoint": str(ckpt_dir),
        "config": str(config),
        "lavis_config": str(Path(model_config).resolve()) if model_config else "",
        "derived_settings": derived,
        "anatomy_table": table.name,
        "top_level_keys": info["top_level_keys"],
        "epoch": info["epoch"],
        "model_tensors": len(target),
        "mapped": len(mapped) - len(filled),
        "renamed": report["renamed"],
        "reshaped": report["reshaped"],
        "unmapped": report["unmapped"],
        "filled_from_text_model": filled,
        "text_encoder": fields,
        "tokenizer": cfg.model.text.tokenizer,
        "tokenizer_size": len(model.tokenizer),
    }
    atomic_write_text(out / "conversion.json", json.dumps(result, indent=2) + "\n")
    log.info("converted %s -> %s: %d of %d model tensors from the file (%d renamed, %d reshaped%s), %d unmapped "
             "extra key(s)%s; dropped top-level entries: %s", ckpt, ckpt_dir, result["mapped"], len(target),
             len(report["renamed"]), len(report["reshaped"]), f", {len(filled)} from the text model" if filled else "",
             len(report["unmapped"]), f" ({', '.join(sorted({_kind(k) for k in report['unmapped']}))})"
             if report["unmapped"] else "", [k for k in info["top_level_keys"] if k != "model"] or "none")
    return result


def import_released_volumes(images: str | Path, masks: str | Path, out: str | Path, split: str,
                            anatomy_table: str | Path = "released",
                            hu_window: tuple[float, float] = (-1150.0, 350.0)) -> list[str]:
    """Store volumes the released preprocessing wrote (``processed_*_images/*.nii.gz``: float32 in [0, 1] =
    HU windowed by ``hu_window``; ``processed_*_masks``: anatomy ids 1..A) as processed volumes of ``split`` in
    ``out``, so ``fvlm eval`` / ``embed`` score exactly the arrays the released eval.py reads.

    The array axes are kept as stored ((D, H, W), no reorientation: MONAI ``LoadImaged`` does none either). The
    image goes back to integer HU (``round(x * (high - low) + low)``); a value that is not within 0.01 HU of an
    integer is an error naming the file (the store keeps integer HU, so such a volume would be changed).
    Returns the volume names; every failure is reported together at the end (``ValueError``).
    """
    images, masks, out = Path(images), Path(masks), Path(out)
    table = load_anatomy_table(anatomy_table)
    files = sorted(images.glob("*.nii.gz"))
    if not files:
        raise FileNotFoundError(f"{images}: no .nii.gz volumes")
    low, high = float(hu_window[0]), float(hu_window[1])
    done, errors = [], []
    for f in files:
        name = f.name[: -len(".nii.gz")]
        try:
            mpath = masks / f.name
            if not mpath.is_file():
                raise FileNotFoundError(f"mask {mpath} not found")
            img = nib.load(str(f))
            x = np.asarray(img.dataobj, dtype=np.float64)
            m = np.asarray(nib.load(str(mpath)).dataobj)
            if x.ndim != 3 or m.shape != x.shape:
                raise ValueError(f"image {x.shape} and mask {m.shape} must be equal 3D shapes")
            hu = x * (high - low) + low
            rounded = np.rint(hu)
            if np.abs(hu - rounded).max() > 0.01:
                raise ValueError(f"values are not integer HU windowed by {hu_window} (largest distance to an integer "
                                 f"{np.abs(hu - rounded).max():.3f} HU)")
            if (m != np.rint(m)).any() or m.min() < 0 or m.max() > len(table):
                raise ValueError(f"mask values must be integers 0..{len(table)} (anatomies {table.names})")
            mask = m.astype(np.uint8)
            counts = count_values(mask, len(table))
            anatomies = {}
            for k, anatomy in enumerate(table.names):
                box = bounding_box(mask == k + 1) if counts[k] else None
                anatomies[anatomy] = {"voxels": int(counts[k]), "bbox": list(box) if box else None}
            zooms = img.header.get_zooms()[:3]
            meta = {"scan": name.rsplit("_", 1)[0], "spacing": [float(z) for z in zooms[::-1]], "anatomies": anatomies,
                    "source": {"image": str(f.resolve()), "mask": str(mpath.resolve()), "version": "released"}}
            store.write_volume(out, split, name, np.clip(rounded, low, high).astype(np.int16), mask, meta)
            done.append(name)
        except (OSError, ValueError) as e:
            errors.append(f"{f}: {e}")
    store.rebuild_manifest(out, list(table.names))
    if errors:
        raise ValueError(f"{len(errors)} of {len(files)} volume(s) could not be imported: " + "; ".join(errors))
    log.info("imported %d released volumes into %s/%s", len(done), out, split)
    return done


def _kind(key: str) -> str:
    """A short family name of an unmapped key for the summary line (e.g. ``text_encoder.cls``)."""
    parts = key.split(".")
    if parts[0] == "text_encoder" and len(parts) > 2 and parts[1] == "bert":
        return ".".join(parts[:3])
    if "crossattention" in parts:
        return "text_encoder.*.crossattention"
    return ".".join(parts[:2])


__all__ = ["build_config", "config_differences", "convert_official", "import_released_volumes", "infer_text_config",
           "infer_vision_fields", "load_official_state", "map_official_keys", "read_lavis_config"]
