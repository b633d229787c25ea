"""fvlm: fine-grained (anatomy-level) vision-language pre-training for 3D CT.

The fVLM method (Shui et al., ICLR 2025) as software: data preparation for CT-RATE-format data sets,
anatomy-wise contrastive pre-training with dual false-negative reduction, zero-shot diagnosis and the
CT-CLIP metrics, and inference on one's own scans.
"""

__version__ = "0.1.0"

__all__ = ["FVLM", "__version__", "load"]


def load(checkpoint, device="cpu"):
    """Load a model for prediction (returns a :class:`fvlm.predict.Predictor`); see :mod:`fvlm.predict`.

    ``checkpoint``: a run directory, a checkpoint directory, an ``fvlm export`` folder, or a Hugging Face Hub
    id (``"org/name"``, read from the local cache when ``HF_HUB_OFFLINE=1``). Nothing outside it is needed.
    """
    from fvlm.predict import load as _load

    return _load(checkpoint, device=device)


def __getattr__(name):
    if name == "FVLM":  # imported lazily: ``import fvlm`` stays light
        from fvlm.model.fvlm import FVLM

        return FVLM
    raise AttributeError(f"module 'fvlm' has no attribute {name!r}")
