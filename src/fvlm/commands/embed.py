"""fvlm embed: per-volume, per-anatomy image and text embeddings -> safetensors."""
from __future__ import annotations

import argparse

NAME = "embed"
HELP = "per-volume, per-anatomy image and text embeddings -> safetensors (input of fvlm metrics --retrieval)"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP)
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--data", required=True, help="processed data directory")
    p.add_argument("--split", default="valid")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--texts", default="", help="directory with desc_info.json / conc_info.json (default: DATA/texts)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=0, help="crops per forward pass (0 = config)")
    return p


def run(args: argparse.Namespace) -> int:
    # library imported here, not at the top: `fvlm --help` imports every command module, and the library pulls in
    # torch/transformers (~2-4 s measured) which a parser must not pay
    from fvlm.embed import embed

    embed(args.checkpoint, data=args.data, split=args.split, out=args.out, device=args.device,
          batch_size=args.batch_size, texts=args.texts or None)
    return 0
