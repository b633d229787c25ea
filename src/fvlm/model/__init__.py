"""The fVLM model: 3D ViT (:mod:`.vit3d`), BERT text encoder (:mod:`.text_encoder`), anatomy pooling
(:mod:`.anatomy_pooling`) and their composition (:mod:`.fvlm`).

``FVLM`` and the weight helpers are imported lazily: importing a submodule (e.g. the anatomy pooling) does
not pull in MONAI and transformers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FVLM", "load_weights", "param_groups", "save_weights"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fvlm.model import fvlm

        return getattr(fvlm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
