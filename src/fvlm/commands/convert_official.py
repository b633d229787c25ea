"""fvlm convert-official: the authors' released fVLM checkpoint (LAVIS format) -> a run directory."""
from __future__ import annotations

import argparse

from fvlm.commands._common import add_config_args

NAME = "convert-official"
HELP = "convert the authors' released fVLM checkpoint (LAVIS format) into a run directory"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP)
    p.add_argument("ckpt", help="released checkpoint (torch file with a 'model' state dict)")
    p.add_argument("--out", required=True, help="run directory to write (checkpoints/, config.json, ...)")
    p.add_argument("--text-model", default="", help="local CXR-BERT directory (BiomedVLP-CXR-BERT-specialized): "
                                                    "tokenizer, and text weights the checkpoint may lack")
    p.add_argument("--tokenizer", default="", help="tokenizer directory (default: --text-model)")
    p.add_argument("--anatomy-table", default="released", help="anatomy table of the checkpoint (name or JSON)")
    p.add_argument("--model-config", default="", help="the LAVIS run config of the checkpoint (YAML): vit_num_heads "
                                                       "and max_txt_len (the other sizes come from the tensors)")
    add_config_args(p, default="paper_released")
    p.add_argument("--trust-pickle", action="store_true",
                   help="if the file needs more than tensors to load (weights_only fails), unpickle it anyway: "
                        "runs code from the file, so only for files from a source you trust")
    return p


def run(args: argparse.Namespace) -> int:
    # library imported here, not at the top: `fvlm --help` imports every command module, and the library pulls in
    # torch/transformers (~2-4 s measured) which a parser must not pay
    from fvlm.convert import convert_official

    convert_official(args.ckpt, args.out, text_model=args.text_model, tokenizer=args.tokenizer,
                     anatomy_table=args.anatomy_table, config=args.config, overrides=args.overrides,
                     trust_pickle=args.trust_pickle, model_config=args.model_config)
    return 0
