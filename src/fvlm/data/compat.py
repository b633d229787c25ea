"""Does a processed store fit a configuration? One check for every job that reads a store with a model.

A store (``fvlm preprocess`` output) records the data settings it was made with in ``preprocess_config.json``
(``{"data": {...}, "anatomy_table": {...}}``). A model only works on volumes prepared its way: the same voxel
spacing, the same HU window and the same anatomies (in the same order, as the label maps were merged).
:func:`check_store` refuses anything else (training, fine-tuning, co-teaching, probes, ``fvlm eval``,
``fvlm embed``); ``fvlm predict`` reads raw scans and prepares them with the checkpoint's own preprocessing, so
there is no store to check there. :func:`config_for_store` builds ``fvlm train``'s configuration from a store
when no ``--config`` is given, so that the two cannot disagree.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from fvlm.anatomy import AnatomyTable
from fvlm.config import (
    Config,
    DataConfig,
    _merge,
    _to_jsonable,
    apply_overrides,
    config_from_dict,
    load_config,
    preset_path,
)

log = logging.getLogger(__name__)

SETTINGS = "preprocess_config.json"
DEFAULT_TRAIN_PRESET = "demo"  # fvlm train's model and training settings when no --config is given


def store_settings(data: str | Path) -> dict[str, Any] | None:
    """The store's ``preprocess_config.json`` (``None`` when it has none); ValueError when it cannot be read."""
    path = Path(data) / SETTINGS
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"expected a JSON object, got {type(saved).__name__}")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the store's preprocessing settings ({e})") from None
    return saved


def check_store(cfg: Config, table: AnatomyTable, data: str | Path, required: bool = True) -> None:
    """Refuse data preprocessed with another spacing/window/anatomy table than the run's config.

    ValueError naming every difference and the flags that fix it. A store without ``preprocess_config.json``:
    FileNotFoundError, or with ``required=False`` nothing to compare (volumes imported by
    :func:`fvlm.convert.import_released_volumes` carry no settings; ``fvlm eval`` scores them).
    """
    data = Path(data)
    saved = store_settings(data)
    if saved is None:
        if not required:
            log.info("%s has no %s: its preprocessing cannot be checked against the model's", data, SETTINGS)
            return
        raise FileNotFoundError(f"{data / SETTINGS} not found: is {data} a directory written by fvlm preprocess?")
    d = saved.get("data", saved)
    problems = []
    for key in ("spacing", "hu_window"):
        if key in d and [float(x) for x in d[key]] != [float(x) for x in getattr(cfg.data, key)]:
            problems.append(f"data.{key}: preprocessed {d[key]} vs config {list(getattr(cfg.data, key))}")
    saved_table = saved.get("anatomy_table")
    if isinstance(saved_table, dict) and [a["name"] for a in saved_table.get("anatomies", [])] != list(table.names):
        problems.append(f"anatomies: preprocessed {[a['name'] for a in saved_table['anatomies']]} vs "
                        f"config {list(table.names)}")
    if problems:
        raise ValueError(f"{data} was preprocessed with a different configuration: " + "; ".join(problems)
                         + "; fvlm train without --config takes the data settings from the store; otherwise pass the "
                         "--config it was preprocessed with (or --set data.KEY=VALUE); a trained model needs data "
                         "preprocessed its way: fvlm preprocess --config RUN/config.json --out NEW_DIR")


def config_for_store(store: str | Path, name_or_path: str | Path | None = None,
                     overrides: list[str] | None = None) -> Config:
    """``fvlm train``'s configuration, which cannot disagree with the data it is given.

    With a preset or file, that (the store is then checked against it by training). Without one, the data
    settings are the ones the store was preprocessed with (its ``preprocess_config.json``) and everything else
    comes from the default preset (:data:`DEFAULT_TRAIN_PRESET`). ``overrides`` apply last.
    """
    if name_or_path is not None:
        return load_config(name_or_path, overrides)
    stored = store_settings(store)
    if stored is None:
        return load_config(DEFAULT_TRAIN_PRESET, overrides)  # training reports the missing store itself
    path = Path(store) / SETTINGS
    data = stored.get("data", stored)
    known = {f.name for f in dataclasses.fields(DataConfig)} - {"texts"}
    base = _merge(_to_jsonable(dataclasses.asdict(Config())), json.loads(preset_path(DEFAULT_TRAIN_PRESET).read_text()))
    base["data"] = _merge(base["data"], {k: v for k, v in data.items() if k in known})
    try:
        return config_from_dict(apply_overrides(base, overrides))
    except (KeyError, TypeError, ValueError) as e:
        raise type(e)(f"the data settings of {path} do not fit the default preset {DEFAULT_TRAIN_PRESET!r}: {e}; "
                      "pass --config with a preset that fits (e.g. the one the store was preprocessed with) or "
                      "fix it with --set") from None


__all__ = ["DEFAULT_TRAIN_PRESET", "check_store", "config_for_store", "store_settings"]
