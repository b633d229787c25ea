"""fvlm: fine-grained (anatomy-level) vision-language pre-training for 3D CT.

The fVLM method (Shui et al., ICLR 2025) as software: data preparation for CT-RATE-format data sets,
anatomy-wise contrastive pre-training with dual false-negative reduction, zero-shot diagnosis and the
CT-CLIP metrics, and inference on one's own scans.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(checkpoint, device="cpu"):
    """Load a trained run (directory or checkpoint file) for prediction; see :mod:`fvlm.predict`."""
    from fvlm.predict import load as _load

    return _load(checkpoint, device=device)
