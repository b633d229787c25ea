"""Write ``tests/data/checkpoint_v1/`` and ``checkpoint_v1_expected.safetensors`` (run once; committed).

A small model folder in format version 1 (:mod:`fvlm.checkpoint`) with a 48-word WordPiece vocabulary, and
the outputs this code computed from it on fixed inputs: token ids, anatomy image features, text features.
``tests/test_checkpoint.py`` loads the committed folder with the current code and compares, so a change of
the format, of a library's numerics (torch, transformers, MONAI) or of the loading code shows up as a
failing test instead of silently different scores. Do not regenerate it to make that test pass: a new
format needs a new folder (checkpoint_v2) and the old one must keep loading.

    PYTHONPATH=src python tests/data/make_checkpoint_v1.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "checkpoint_v1"
EXPECTED = HERE / "checkpoint_v1_expected.safetensors"
TEXTS = ["lung shows emphysema.", "lung is normal.", "heart shows cardiomegaly.", "aorta shows no abnormality."]
WORDS = ["lung", "heart", "aorta", "esophagus", "shows", "is", "normal", "emphysema", "cardiomegaly", "no",
         "abnormality", "effusion", "nodule", "calcification", "atelectasis", "consolidation", "opacity", "mild",
         "severe", "left", "right", "the", "and", "with", "of", "in", "a", "findings", "impression", "present",
         "pericardial", "pleural", "arterial", "wall", ".", ",", "##s", "##al", "##ic"]


def inputs(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed image in [0, 1] and a mask with every anatomy present (same on every machine)."""
    d, h, w = cfg.data.crop_size
    z, y, x = torch.meshgrid(torch.linspace(0, 1, d), torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    image = (0.5 + 0.25 * torch.sin(7 * z + 3 * y) * torch.cos(5 * x)).reshape(1, 1, d, h, w)
    mask = torch.zeros(1, d, h, w, dtype=torch.uint8)
    for k in range(4):
        mask[:, 2 * k : 2 * k + 6, 4:28, 10 * k : 10 * k + 10] = k + 1
    return image, mask


def outputs(model, cfg) -> dict[str, torch.Tensor]:
    image, mask = inputs(cfg)
    tok = model.tokenizer(TEXTS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        feats, present = model.encode_image(image, mask)
        text = model.encode_text(tok["input_ids"], tok["attention_mask"])
    return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"], "image_features": feats,
            "present": present.to(torch.uint8), "text_features": text, "temperature": model.temp.detach().reshape(1)}


def main() -> None:
    from fvlm.anatomy import load_anatomy_table
    from fvlm.checkpoint import save_checkpoint
    from fvlm.config import load_config
    from fvlm.model.fvlm import FVLM

    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab"
        vocab.mkdir()
        (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
        (vocab / "config.json").write_text(json.dumps({"model_type": "bert"}))
        cfg = load_config("tiny", [
            f"model.text.pretrained={vocab}", "model.vision.width=16", "model.vision.mlp_dim=32",
            'model.text.random_init={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, '
            '"intermediate_size": 32, "max_position_embeddings": 32}', "model.text.max_length=32", "model.embed_dim=8"])
        torch.manual_seed(0)
        model = FVLM(cfg, num_anatomies=4).eval()
        with torch.no_grad():
            model.query_tokens.normal_()
            model.temp.fill_(0.05)
        run = Path(tmp) / "run"
        ckpt = save_checkpoint(run, 1, model, cfg, load_anatomy_table("released"))
        # the committed folder must not name this temporary directory as anything it needs
        shutil.rmtree(FOLDER, ignore_errors=True)
        shutil.copytree(ckpt, FOLDER)
        save_file({k: v.contiguous() for k, v in outputs(model, cfg).items()}, str(EXPECTED))
    print(f"wrote {FOLDER} and {EXPECTED}")  # noqa: T201


if __name__ == "__main__":
    main()
