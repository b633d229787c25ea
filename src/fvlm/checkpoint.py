"""Run directories, checkpoints and model folders: self-contained, movable, checked on load.

A run directory ``RUN/`` holds ``config.json`` (the resolved configuration), ``anatomy_table.json``,
``log.csv``, ``tb/`` (TensorBoard) and ``checkpoints/step_{n:07d}/``. Each checkpoint is a *model folder*
that needs nothing outside itself (no text-model directory, no preset, no store):

- ``model.safetensors``: every weight, the text encoder's included (safetensors: no pickle),
- ``config.json``: the resolved configuration (provenance: ``model.text.pretrained`` is where the text
  model came from, it is never read again),
- ``anatomy_table.json``: anatomies, their TotalSegmentator classes and the zero-shot prompts,
- ``preprocessing.json``: what a scan must go through before the model sees it (spacing, HU window(s),
  crop sizes, margin, orientation, anatomy groups): :func:`preprocessing_spec`,
- ``text/``: the tokenizer files and the text encoder's ``config.json`` (the BERT architecture); the text
  encoder is rebuilt from these plus the weights,
- ``training_state.pt`` (training checkpoints only): optimizer, scheduler, step, epoch position and the RNG
  states of every rank, loadable with ``torch.load(weights_only=True)``,
- ``manifest.json``, written last: size and SHA-256 of every other file, plus the library versions that
  wrote it. It is checked on load; a truncated or damaged file is reported by name.

A checkpoint directory is written under a temporary name and renamed when complete, so a killed job never
leaves a checkpoint that looks valid but is not; ``checkpoints/latest`` names the newest one. When the
newest checkpoint fails its manifest check, :func:`latest_checkpoint` falls back to the next older complete
one and logs it. ``fvlm export`` (:mod:`fvlm.export`) writes the same files as a Hugging Face model folder.

Every file is safetensors or JSON: no pickled classes, so a folder written with one version of torch,
transformers or MONAI loads with another (``tests/data/checkpoint_v1`` is a folder written by format
version 1 that the tests load and compare against stored outputs).
"""

from __future__ import annotations

import copy
import importlib.metadata as md
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig

from fvlm.anatomy import AnatomyTable, alignment, load_anatomy_table
from fvlm.config import Config, config_from_dict
from fvlm.hub import is_hub_id, quiet_transformers, snapshot
from fvlm.io import atomic_dir, atomic_write_text, file_sha256
from fvlm.model.fvlm import FVLM, load_weights, save_weights

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
STATE = "training_state.pt"
CONFIG = "config.json"
TABLE = "anatomy_table.json"
PREPROCESSING = "preprocessing.json"
TEXT_DIR = "text"
MANIFEST = "manifest.json"
FORMAT = "fvlm-model-folder"
FORMAT_VERSION = 1
REQUIRED = (WEIGHTS, CONFIG, TABLE)


class CheckpointError(ValueError):
    """A checkpoint or model folder that cannot be used (damaged, truncated, incomplete); names the file."""


# ----------------------------------------------------------------------------------------------- manifest
def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour a model folder depends on (recorded, not enforced)."""
    out = {}
    for name in ("fvlm", "torch", "transformers", "tokenizers", "safetensors", "monai", "huggingface_hub"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Write ``manifest.json`` (size + SHA-256 of every file below ``folder``); call it after every other file."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != MANIFEST and not rel.startswith(".") and "/." not in rel:
            files[rel] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "written_by": library_versions(), "files": files}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_folder(folder: str | Path, hashes: bool = True) -> list[str]:
    """Problems of a model folder against its manifest (empty list = intact).

    Missing required files are problems; a folder without ``manifest.json`` (written before format version 1)
    is only checked for its required files. ``hashes=False`` checks sizes only (fast).
    """
    folder = Path(folder)
    problems = [f"{folder / name}: missing" for name in REQUIRED if not (folder / name).is_file()]
    path = folder / MANIFEST
    if not path.is_file():
        return problems
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return problems + [f"{path}: unreadable manifest ({e})"]
    for rel, want in files.items():
        p = folder / rel
        if not p.is_file():
            if f"{p}: missing" not in problems:
                problems.append(f"{p}: missing (listed in {MANIFEST})")
            continue
        size = p.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{p}: {size} bytes, {MANIFEST} says {want['bytes']} (truncated or damaged)")
        elif hashes and file_sha256(p) != want["sha256"]:
            problems.append(f"{p}: SHA-256 differs from {MANIFEST} (damaged)")
    return problems


# ----------------------------------------------------------------------------------------------- writing
def preprocessing_spec(cfg: Config, table: AnatomyTable) -> dict[str, Any]:
    """What a scan must go through before this model sees it (``preprocessing.json``)."""
    d = cfg.data
    return {
        "format": "fvlm-preprocessing",
        "format_version": FORMAT_VERSION,
        "input": "CT volume in Hounsfield units (NIfTI or DICOM) and its TotalSegmentator v2 'total' multilabel map",
        "orientation": "LPS; arrays (z, y, x)",
        "spacing_xyz_mm": list(d.spacing),
        "resampling": {"image": "trilinear", "mask": "nearest"},
        "hu_window": list(d.hu_window),
        "input_windows": [list(w) for w in cfg.input_windows],
        "intensity": "clip to hu_window, scale to [0, 1]; one model input channel per input window",
        "margin_zyx_voxels": list(d.margin),
        "crop_size_zyx": list(d.crop_size),
        "eval_crop_size_zyx": list(d.eval_crop_size),
        "patch_size_zyx": list(cfg.model.vision.patch_size),
        "anatomy_table": table.name,
        "anatomies": [{"name": a.name, "totalsegmentator_classes": list(a.classes)} for a in table.anatomies],
        "text_max_length": cfg.model.text.max_length,
    }


def save_text_files(model: torch.nn.Module, folder: str | Path) -> None:
    """The tokenizer and the text encoder's architecture (``config.json``), so no text-model path is needed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.tokenizer.save_pretrained(str(folder))
    text_config = model.text_encoder.config.to_dict()
    atomic_write_text(folder / "config.json", json.dumps(text_config, indent=2, sort_keys=True, default=str) + "\n")


def write_model_files(folder: str | Path, model: torch.nn.Module, cfg: Config, table: AnatomyTable) -> None:
    """Weights, config, anatomy table, preprocessing spec and text files of a model folder (no manifest)."""
    folder = Path(folder)
    save_weights(model, folder / WEIGHTS)
    cfg.save(folder / CONFIG)
    atomic_write_text(folder / TABLE, json.dumps(table.to_dict(), indent=2) + "\n")
    atomic_write_text(folder / PREPROCESSING, json.dumps(preprocessing_spec(cfg, table), indent=2) + "\n")
    save_text_files(model, folder / TEXT_DIR)


def checkpoint_dir(run: str | Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step_{step:07d}"


def save_checkpoint(run: str | Path, step: int, model: torch.nn.Module, cfg: Config, table: AnatomyTable,
                    training_state: dict[str, Any] | None = None,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``checkpoints/step_{step}`` atomically (temp dir + rename) and point ``latest`` at it.

    ``extra(folder)`` writes further files into the folder before the manifest (e.g. fine-tuning heads), so
    they are covered by the same integrity check."""
    final = checkpoint_dir(run, step)
    with atomic_dir(final) as tmp:
        write_model_files(tmp, model, cfg, table)
        if training_state is not None:
            torch.save(training_state, tmp / STATE)
        if extra is not None:
            extra(tmp)
        write_manifest(tmp)  # last: a folder whose manifest matches is complete
    atomic_write_text(final.parent / "latest", final.name + "\n")
    log.info("checkpoint %s", final)
    return final


def clean_stale(run: str | Path) -> None:
    """Remove temporary checkpoint directories left by a killed job."""
    root = Path(run) / "checkpoints"
    for p in root.glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- finding
def is_complete(ckpt: Path) -> bool:
    """The required files are present (see :func:`verify_folder` for the full check)."""
    return all((Path(ckpt) / f).is_file() for f in REQUIRED)


def _candidates(root: Path) -> list[Path]:
    """Checkpoints of ``root`` (``RUN/checkpoints``), the one ``latest`` names first, then newest to oldest."""
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in steps:
            steps = [named] + [p for p in steps if p.name < named.name]
    return steps


def latest_checkpoint(run: str | Path, verify: bool = True, require: tuple[str, ...] = ()) -> Path | None:
    """The newest intact checkpoint of a run directory, or ``None``.

    ``verify``: check each candidate against its manifest (sizes and SHA-256); a damaged one is skipped with
    a warning naming the files, and the next older one is tried. ``require``: further files the checkpoint
    must hold (e.g. ``training_state.pt`` to resume).
    """
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return None
    for ckpt in _candidates(root):
        problems = verify_folder(ckpt, hashes=True) if verify else [
            f"{ckpt / f}: missing" for f in REQUIRED if not (ckpt / f).is_file()]
        problems += [f"{ckpt / f}: missing" for f in require if not (ckpt / f).is_file()]
        if not problems:
            return ckpt
        log.warning("checkpoint %s is not usable (%s); trying the next older one", ckpt, "; ".join(problems))
    return None


def resolve_checkpoint(path: str | Path, verify: bool = True) -> Path:
    """A model folder (checkpoint, converted or exported model), a run directory (-> its newest intact
    checkpoint) or a Hugging Face Hub id (``org/name``: from the local cache when offline).

    Raises ``CheckpointError`` naming the damaged files, ``FileNotFoundError`` when nothing is there.
    """
    p = Path(path)
    if not p.exists():
        if is_hub_id(str(path)):
            p = snapshot(str(path))
        else:
            raise FileNotFoundError(f"{p}: no such model folder, run directory or Hugging Face Hub id")
    if (p / WEIGHTS).exists() or (p / MANIFEST).exists():
        problems = verify_folder(p, hashes=verify)
        if problems:
            raise CheckpointError(f"{p} is damaged or incomplete: " + "; ".join(problems))
        return p
    ckpt = latest_checkpoint(p, verify=verify)
    if ckpt is None:
        found = sorted(x.name for x in (p / "checkpoints").glob("step_*")) if (p / "checkpoints").is_dir() else []
        if found:
            raise CheckpointError(f"{p}: no intact checkpoint among {found} (see the warnings above)")
        raise FileNotFoundError(f"{p}: neither a model folder (with {WEIGHTS}, {CONFIG}, {TABLE}) nor a run "
                                f"directory with checkpoints/")
    return ckpt


# ----------------------------------------------------------------------------------------------- loading
def _read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def load_run_config(ckpt: Path) -> tuple[Config, AnatomyTable]:
    """Configuration and anatomy table of a model folder (a checkpoint's plain config or an export's)."""
    ckpt = Path(ckpt)
    d = _read_json(ckpt / CONFIG)
    if isinstance(d, dict) and d.get("model_type") == "fvlm" and "cfg" in d:  # exported (Hugging Face) layout
        d = d["cfg"]
    try:
        cfg = config_from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / CONFIG}: {e}") from None
    table = load_anatomy_table(ckpt / TABLE)
    return cfg, table


def load_training_state(ckpt: Path) -> dict[str, Any]:
    """``training_state.pt`` with ``weights_only=True``; a damaged file raises ``CheckpointError`` naming it."""
    path = Path(ckpt) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: this checkpoint cannot be resumed (no training state)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the training state ({str(e).splitlines()[0]}); the file is "
                              "truncated or damaged") from None


# the BertConfig fields that fix the text encoder's architecture and numerics (the rest is metadata)
TEXT_ARCHITECTURE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                     "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id",
                     "position_embedding_type")


def build_config(cfg: Config, folder: Path) -> Config:
    """The configuration that rebuilds this folder's model without anything outside it.

    With ``text/`` (format 1): the text encoder is built from ``text/config.json`` (its architecture, layer
    truncation included) and the tokenizer from ``text/``; the weights then come from ``model.safetensors``.
    Without it (older checkpoints): the text model named by the config must still exist.
    """
    built = copy.deepcopy(cfg)
    built.model.vision.pretrained = ""  # the weights replace every initialisation
    text_dir = folder / TEXT_DIR
    if not (text_dir / "config.json").is_file():
        log.warning("%s has no %s/ folder (written before format version 1): the text encoder and tokenizer come "
                    "from model.text.pretrained=%r", folder, TEXT_DIR, cfg.model.text.pretrained)
        return built
    saved = _read_json(text_dir / "config.json")
    known = set(BertConfig().to_dict())  # this transformers version's fields (others may have more or fewer)
    fields = {k: saved[k] for k in TEXT_ARCHITECTURE if k in saved and k in known}
    built.model.text.random_init = fields
    built.model.text.pretrained = str(text_dir)
    built.model.text.tokenizer = str(text_dir)
    built.model.text.num_layers = 0  # already applied: text/config.json holds the kept layers
    return built


def load_weights_checked(model: torch.nn.Module, path: Path) -> None:
    """``load_weights`` with a damaged file reported by name (safetensors' own error does not say which)."""
    try:
        load_weights(model, path)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) on a truncated file
        raise CheckpointError(f"{path}: cannot read the weights ({type(e).__name__}: {e}); the file is truncated "
                              "or damaged") from None


def load_model(path: str | Path, device: str | torch.device = "cpu", verify: bool = True
               ) -> tuple[torch.nn.Module, Config, AnatomyTable]:
    """Rebuild the model of a model folder, run directory or Hub id, in eval mode on ``device``.

    Returns the model (``model.anatomy_table`` set), the saved configuration and the anatomy table.
    """
    ckpt = resolve_checkpoint(path, verify=verify)
    cfg, table = load_run_config(ckpt)
    with quiet_transformers():
        model = FVLM(build_config(cfg, ckpt), num_anatomies=len(alignment(cfg, table).table))
    load_weights_checked(model, ckpt / WEIGHTS)
    model.cfg = cfg  # the saved configuration (provenance), not the rebuilt one
    model.anatomy_table = table
    model.source = str(ckpt)
    model.to(device).eval()
    log.info("loaded %s (%s mode, anatomies %s)", ckpt, cfg.loss.mode, table.names)
    return model, cfg, table


__all__ = ["CheckpointError", "build_config", "checkpoint_dir", "clean_stale", "file_sha256", "is_complete",
           "latest_checkpoint", "load_model", "load_run_config", "load_training_state", "preprocessing_spec",
           "resolve_checkpoint", "save_checkpoint", "save_text_files", "verify_folder", "write_manifest",
           "write_model_files"]
