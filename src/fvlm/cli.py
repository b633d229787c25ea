"""The ``fvlm`` command line: parses arguments and calls one library function per subcommand.

Heavy imports (torch, transformers, MONAI) happen inside the subcommand functions so that ``fvlm --help``
stays fast. Every subcommand returns a process exit code (0 = success).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

log = logging.getLogger("fvlm")


# ----------------------------------------------------------------------------------------------- parsers
def _add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--config", default=default,
                   help="preset name (paper_vitb, demo, tiny) or JSON file" + (f" (default: {default})" if default
                                                                                else " (default: built-in defaults)"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable; values are JSON)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvlm", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("FVLM_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic CT-RATE-format data set")
    p.add_argument("--out", required=True, help="output root (CT-RATE layout)")
    p.add_argument("--train", type=int, default=8, help="number of training patients")
    p.add_argument("--valid", type=int, default=4, help="number of validation patients")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=["demo", "full"], default="demo",
                   help="demo: small volumes for CPU runs; full: realistic CT-RATE dimensions")
    p.add_argument("--v2", action="store_true", help="write already-fixed HU volumes (CT-RATE v2) instead of v1")
    p.add_argument("--anatomy-table", default="released",
                   help="anatomy table whose anatomies the reports and anatomy texts describe")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--difficulty", type=float, default=None,
                   help="lesion severity knob in [0, 1] (higher = subtler findings; default: the generator's)")
    p.add_argument("--max-reconstructions", type=int, default=0,
                   help="at most this many reconstructions per scan (0 = 1-3 as drawn)")

    p = sub.add_parser("preprocess", help="fix, merge, resample, crop, window, pad and store volumes")
    p.add_argument("--data", help="CT-RATE-format root (dataset/, metadata/, ...)")
    p.add_argument("--split", choices=["train", "valid"],
                   help="split of --data to process (default: every split present); with --pairs: the split of "
                        "rows without one (default valid)")
    p.add_argument("--pairs", help="CSV with columns volume,image,label[,split]: arbitrary NIfTI image/label pairs "
                                   "(HU already) instead of --data")
    p.add_argument("--out", required=True, help="processed data directory")
    _add_config_args(p)
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    p.add_argument("--shard", default="0/1", help="i/N: process only shard i of N (cluster job arrays)")
    p.add_argument("--version", choices=["auto", "v1", "v2"], default="auto",
                   help="CT-RATE header version: auto-detect per volume (default), or force v1 (rescale) / v2 (HU)")
    p.add_argument("--reconstructions", default="all",
                   help="'all' or a number K: keep at most K reconstructions per scan")
    p.add_argument("--limit", type=int, default=0, help="process only the first N volumes (0 = all)")
    p.add_argument("--include-no-chest", action="store_true",
                   help="also process the volumes listed in metadata/no_chest_{split}.txt (left out by default)")
    p.add_argument("--verify", action="store_true",
                   help="check the content hashes of existing volumes (written at creation) before skipping them: "
                        "damaged ones are redone (reads every stored file)")

    p = sub.add_parser("train", help="pre-train fVLM (single process or torchrun)")
    _add_config_args(p)
    p._option_string_actions["--config"].help = (  # fvlm.config.config_for_store
        "preset name (paper_vitb, demo, tiny) or JSON file (default: the data settings --data was preprocessed "
        "with, the rest from the demo preset)")
    p.add_argument("--data", required=True, help="processed data directory (from fvlm preprocess)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, config.json)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")

    p = sub.add_parser("eval", help="zero-shot diagnosis: score every volume of a split -> scores.csv")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--data", required=True, help="processed data directory")
    p.add_argument("--split", default="valid")
    p.add_argument("--out", required=True, help="scores CSV (VolumeName + one column per scored label)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=0, help="crops per forward pass (0 = config)")
    p.add_argument("--anatomy-table", default="", help="score with this table's prompts (default: the run's)")

    p = sub.add_parser("metrics", help="AUC, accuracy, sensitivity, specificity, F1, precision from scores.csv")
    p.add_argument("scores", nargs="?", help="scores CSV from fvlm eval (may be omitted with --retrieval alone)")
    p.add_argument("--labels", help="labels CSV (VolumeName + 18 CT-RATE label columns); required with SCORES")
    p.add_argument("--json", help="write the metrics as JSON")
    p.add_argument("--plot", help="write ROC curves (PNG)")
    p.add_argument("--thresholds-from", nargs=2, metavar=("SCORES", "LABELS"),
                   help="fit thresholds on another split (honest variant) instead of the evaluated labels")
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for 95%% CIs (0 = off)")
    p.add_argument("--macro-f1", action="store_true", help="also report F1 with average='macro'")
    p.add_argument("--missing", choices=["zero", "drop"], default="zero",
                   help="a missing score counts as 0 (protocol, default) or the volume is dropped for that label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrieval", metavar="EMBEDDINGS", help="report/volume retrieval Recall@K from fvlm embed output")

    p = sub.add_parser("demo", help="synthesise -> preprocess -> train -> eval -> metrics on CPU")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--config", default="demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--train", type=int, default=0, help="training patients (0 = demo default)")
    p.add_argument("--valid", type=int, default=0, help="validation patients (0 = demo default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--texts", choices=["generator", "decomposed"], default="generator",
                   help="anatomy texts from the generator's JSON or from fvlm decompose of the reports")
    p.add_argument("--ablation", action="store_true", help="run the false-negative-reduction ablation instead")
    p.add_argument("--workers", type=int, default=2)

    p = sub.add_parser("decompose", help="split free-text reports into anatomy-wise findings/impression texts")
    p.add_argument("--reports", help="CT-RATE-format reports CSV (repeatable via comma)")
    p.add_argument("--out", help="output directory for desc_info.json and conc_info.json")
    p.add_argument("--anatomies", default="released", help="anatomy table (name or JSON path)")
    p.add_argument("--backend", choices=["rules", "llm"], default="rules")
    p.add_argument("--llm-url", default=os.environ.get("FVLM_LLM_URL", ""),
                   help="OpenAI-compatible base URL (env FVLM_LLM_URL)")
    p.add_argument("--llm-model", default=os.environ.get("FVLM_LLM_MODEL", ""), help="model name (env FVLM_LLM_MODEL)")
    p.add_argument("--llm-cache", default="", help="cache directory for LLM answers (default: OUT/.llm_cache)")
    p.add_argument("--llm-workers", type=int, default=4, help="concurrent LLM requests")
    p.add_argument("--llm-timeout", type=float, default=None, help="seconds per LLM request attempt (default 60)")
    p.add_argument("--llm-retries", dest="llm_max_retries", type=int, default=None,
                   help="retries after a timeout, connection error, HTTP 429 or 5xx (default 2)")
    p.add_argument("--llm-invalid-retries", type=int, default=None,
                   help="further requests after an invalid (garbage or partial JSON) answer (default 1)")
    p.add_argument("--llm-accept-fallback", action="store_true",
                   help="exit 0 even when the LLM was never used (every report fell back to the rules backend)")
    p.add_argument("--lexicon", default="", help="rules backend lexicon JSON (default: the shipped chest-CT lexicon)")
    p.add_argument("--evaluate", metavar="GOLD_DIR", help="compare OUT (or --pred) with reference JSON files")
    p.add_argument("--pred", help="with --evaluate: directory of predicted JSON files (default: --out)")
    p = sub.add_parser("check-data", help="inventory a CT-RATE root before hours are spent: counts, missing files, "
                                          "metadata problems, v1/v2 mix, non-chest volumes, texts, label maps")
    p.add_argument("data", help="CT-RATE-format root (dataset/, metadata/, ...)")
    p.add_argument("--split", choices=["train", "valid"], help="check only this split (default: every split present)")
    p.add_argument("--json", help="write the full report (every listed volume) as JSON")
    p.add_argument("--sample", type=int, default=20,
                   help="per split, read the voxel values of at most K volumes: those whose header cannot tell v1 "
                        "from v2 first, then a spread of the others (0 = headers only; default 20)")
    p.add_argument("--anatomy-table", default="released",
                   help="anatomy table whose anatomies the anatomy-text check looks for")
    p.add_argument("--workers", type=int, default=4, help="threads reading headers")
    p.add_argument("--strict", action="store_true", help="exit 1 when any problem is found (default: report only)")

    p = sub.add_parser("segment", help="TotalSegmentator v2 (task total, roi_subset of the anatomy table) label maps "
                                       "into dataset/{split}_mask/, resumable")
    p.add_argument("--data", help="CT-RATE-format root (dataset/, metadata/, ...)")
    p.add_argument("--split", choices=["train", "valid"], help="split of --data (required with --data)")
    p.add_argument("--pairs", help="CSV volume,image,label[,split] (fvlm preprocess --pairs format): segment each "
                                   "image (HU, correct header) into its label path instead of --data")
    p.add_argument("--anatomy-table", default="released",
                   help="anatomy table whose TotalSegmentator classes are segmented (extended covers released too)")
    p.add_argument("--fast", action="store_true", help="TotalSegmentator's 3 mm model (about 3x faster, coarser)")
    p.add_argument("--device", default=None, help="TotalSegmentator --device: gpu, gpu:N or cpu (default: its own)")
    p.add_argument("--workers", type=int, default=1, help="volumes segmented at the same time")
    p.add_argument("--shard", default="0/1", help="i/N: process only shard i of N (cluster job arrays)")
    p.add_argument("--totalseg-cmd", default="",
                   help="TotalSegmentator executable (e.g. from another environment); default: the Python API if "
                        "installed (fvlm[segment]), else TotalSegmentator on PATH")
    p.add_argument("--task", default="total",
                   help="TotalSegmentator task (default total; total_v2 reproduces v2 maps with TotalSegmentator 3)")
    p.add_argument("--version", choices=["auto", "v1", "v2"], default="auto",
                   help="CT-RATE header version: auto-detect per volume (default), or force v1 (fix) / v2 (HU)")
    p.add_argument("--reconstructions", default="all",
                   help="'all' or a number K: segment at most K reconstructions per scan (as fvlm preprocess)")
    p.add_argument("--include-no-chest", action="store_true",
                   help="also segment the volumes listed in metadata/no_chest_{split}.txt (left out by default)")
    p.add_argument("--exclude-no-chest", action="store_true", help=argparse.SUPPRESS)  # the default; old scripts
    p.add_argument("--limit", type=int, default=0, help="segment only the first N volumes (0 = all)")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="seconds per volume before a TotalSegmentator subprocess is killed (0 = no limit)")
    p.add_argument("--verify", choices=["header", "full"], default="header",
                   help="how existing maps are checked before being skipped: header (shape, geometry) or full "
                        "(also inflate the data)")
    p.add_argument("--tmp-dir", default="", help="folder for fixed v1 volumes handed to TotalSegmentator "
                                                  "(default: next to the failures CSV; cleaned by the next run)")
    p.add_argument("--failures", default="", help="failures CSV (default: dataset/{split}_mask/segment_failures.csv "
                                                  "or next to --pairs)")

    p = sub.add_parser("radchestct", help="convert Rad-ChestCT .npz volumes and labels into NIfTI + pairs CSV + "
                                          "CT-RATE-format labels (an external test set)")
    p.add_argument("--npz-dir", required=True, help="folder of {NoteAcc_DEID}.npz volumes")
    p.add_argument("--labels", required=True,
                   help="Rad-ChestCT label CSV (NoteAcc_DEID + abnormality columns, or abnormality*location columns)")
    p.add_argument("--mapping", choices=["standard", "fvlm", "extended"], default="standard",
                   help="Rad-ChestCT -> CT-RATE label mapping (16, 15 or 18 CT-RATE labels)")
    p.add_argument("--masks", default="", help="folder of TotalSegmentator label maps {id}.nii.gz (default OUT/masks; "
                                               "existing maps are checked against the images)")
    p.add_argument("--out", required=True, help="output folder (images/, pairs.csv, labels_{mapping}.csv)")
    p.add_argument("--split", default="", help="split name for every volume (default: imgtrain/imgvalid/imgtest "
                                               "from the id prefix)")
    p.add_argument("--orientation", choices=["check", "documented", "flip"], default="check",
                   help="z direction: check against anatomy and flip when it disagrees (default), trust the "
                        "documented convention, or flip every volume")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--limit", type=int, default=0, help="convert only the first N volumes (0 = all)")

    p = sub.add_parser("predict", help="zero-shot findings for one scan (NIfTI file or DICOM folder) -> JSON [+ PNG]")
    p.add_argument("scan", help="NIfTI file (.nii/.nii.gz, HU), DICOM series folder, or a 3D image SimpleITK reads")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--mask", help="TotalSegmentator v2 'total' multilabel map of the scan (TotalSegmentator --ml); "
                                  "default: run TotalSegmentator if available")
    p.add_argument("--out", help="result JSON (default: print to stdout)")
    p.add_argument("--png", help="overlay picture: axial + coronal slices, anatomy contours, top findings")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--series", default="", help="DICOM SeriesInstanceUID when the folder holds several series "
                                                "(default: the one with most slices)")
    p.add_argument("--totalseg-cmd", default="", help="TotalSegmentator executable (without --mask; default: the "
                                                      "Python API if installed, else TotalSegmentator on PATH)")
    p.add_argument("--totalseg-device", default="", help="TotalSegmentator --device: gpu, gpu:N or cpu")
    p.add_argument("--fast", action="store_true", help="TotalSegmentator's 3 mm model (faster, coarser)")
    p.add_argument("--save-mask", default="", help="keep the label map TotalSegmentator made (reuse with --mask)")

    p = sub.add_parser("convert-official", help="convert the authors' released fVLM checkpoint (LAVIS format) into "
                                                "a run directory")
    p.add_argument("ckpt", help="released checkpoint (torch file with a 'model' state dict)")
    p.add_argument("--out", required=True, help="run directory to write (checkpoints/, config.json, ...)")
    p.add_argument("--text-model", default="", help="local CXR-BERT directory (BiomedVLP-CXR-BERT-specialized): "
                                                    "tokenizer, and text weights the checkpoint may lack")
    p.add_argument("--tokenizer", default="", help="tokenizer directory (default: --text-model)")
    p.add_argument("--anatomy-table", default="released", help="anatomy table of the checkpoint (name or JSON)")
    p.add_argument("--model-config", default="", help="the LAVIS run config of the checkpoint (YAML): vit_num_heads "
                                                       "and max_txt_len (the other sizes come from the tensors)")
    _add_config_args(p, default="paper_released")
    p.add_argument("--trust-pickle", action="store_true",
                   help="if the file needs more than tensors to load (weights_only fails), unpickle it anyway: "
                        "runs code from the file, so only for files from a source you trust")

    p = sub.add_parser("embed", help="per-volume, per-anatomy image and text embeddings -> safetensors "
                                     "(input of fvlm metrics --retrieval)")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--data", required=True, help="processed data directory")
    p.add_argument("--split", default="valid")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--texts", default="", help="directory with desc_info.json / conc_info.json (default: DATA/texts)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=0, help="crops per forward pass (0 = config)")

    p = sub.add_parser("export", help="write a run, checkpoint or converted model as a Hugging Face model folder "
                                      "(safetensors, config, tokenizer, preprocessing spec, model card)")
    p.add_argument("run", help="run directory, checkpoint directory or convert-official output")
    p.add_argument("out", help="model folder to write (load with fvlm.load(OUT); upload as a Hub model repo)")
    p.add_argument("--metrics", default="", help="fvlm metrics --json output for the model card's zero-shot table "
                                                 "(default: RUN/metrics.json if present)")
    p.add_argument("--training-data", default="", help="one paragraph on the training data for the model card")
    p.add_argument("--dataset", action="append", default=[], help="Hub data set id for the card's metadata, e.g. "
                                                                   "ibrahimhamamci/CT-RATE (repeatable)")
    p.add_argument("--license", default="apache-2.0", help="license id for the card's metadata")
    p.add_argument("--name", default="", help="model name in the card (default: OUT's folder name)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("probe", help="linear probes (logistic regression per label) on the frozen anatomy embeddings, "
                                     "at several label fractions and seeds, against zero-shot")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory (kept frozen)")
    p.add_argument("--data", required=True, help="processed data directory (training and evaluated splits)")
    p.add_argument("--labels", required=True,
                   help="labels CSV(s), comma-separated (VolumeName + 0/1 columns; empty = missing, excluded)")
    p.add_argument("--out", required=True, help="output directory (scores/, probe.json, probe_auc.png, cache/)")
    p.add_argument("--fractions", default="0.01,0.1,1", help="fractions of the training labels (default 0.01,0.1,1)")
    p.add_argument("--seeds", type=int, default=3, help="subsampling / cross-validation seeds per fraction")
    p.add_argument("--features", choices=["mapped", "concat"], default="mapped",
                   help="mapped: the anatomy the anatomy map reads each label from; concat: all anatomies")
    p.add_argument("--anatomy-map", default="", help="label -> anatomy map: an anatomy table (name or JSON) or a JSON "
                                                     "{label: anatomy | [anatomies]} (default: the run's table)")
    p.add_argument("--columns", default="", help="comma-separated label columns to use (default: all)")
    p.add_argument("--train-split", default="train", help="split the heads are fitted on")
    p.add_argument("--split", default="valid", help="split that is scored")
    p.add_argument("--cache", default="", help="embeddings cache directory (default: OUT/cache)")
    p.add_argument("--no-zero-shot", action="store_true", help="do not score the run's zero-shot prompts")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=0, help="crops per forward pass (0 = config)")

    p = sub.add_parser("finetune", help="fine-tune the image encoder + anatomy pooling end to end with per-label "
                                        "heads (single process or torchrun); scores a split in the fvlm eval format")
    p.add_argument("--checkpoint", default="",
                   help="pre-trained run or checkpoint directory (not needed with --resume)")
    p.add_argument("--data", required=True, help="processed data directory")
    p.add_argument("--labels", default="",
                   help="labels CSV(s), comma-separated (VolumeName + 0/1 columns; empty = missing, excluded)")
    p.add_argument("--out", required=True, help="fine-tuned run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the pre-trained run's config, e.g. --set train.max_steps=300 (repeatable; "
                        "fine-tuning defaults: " + " ".join(["train.lr=1e-4", "train.epochs=5", "..."]) + ")")
    p.add_argument("--resume", action="store_true", help="continue exactly from the last checkpoint in --out")
    p.add_argument("--features", choices=["mapped", "concat"], default="mapped",
                   help="heads read the anatomy the anatomy map gives each label (mapped) or all anatomies (concat)")
    p.add_argument("--anatomy-map", default="", help="label -> anatomy map: an anatomy table (name or JSON) or a JSON "
                                                     "{label: anatomy | [anatomies]} (default: the run's table)")
    p.add_argument("--columns", default="", help="comma-separated label columns to use (default: all)")
    p.add_argument("--loss", choices=["bce", "focal"], default="bce")
    p.add_argument("--focal-gamma", type=float, default=2.0)
    p.add_argument("--no-class-weights", action="store_true", help="BCE without pos_weight = negatives/positives")
    p.add_argument("--layer-decay", type=float, default=1.0, help="layer-wise learning-rate decay (1 = off)")
    p.add_argument("--head-lr-scale", type=float, default=10.0, help="learning rate of the heads relative to train.lr")
    p.add_argument("--jitter", type=float, default=0.1, help="random shift of the training crop (fraction of its size)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="use this fraction of the training labels (stratified per label, seed train.seed)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--split", default="valid", help="split scored at the end into OUT/scores_{split}.csv ('' = none)")
    p.add_argument("--score-only", action="store_true", help="only score --split with the fine-tuned run in --out")
    p.add_argument("--scores", default="", help="with --score-only: scores CSV path (default OUT/scores_{split}.csv)")
    p.add_argument("--device", default="auto")
    return parser


# ----------------------------------------------------------------------------------------------- commands
def _cmd_synth(args: argparse.Namespace) -> int:
    from fvlm.synth import synthesize

    extra = {} if args.difficulty is None else {"difficulty": args.difficulty}
    synthesize(args.out, n_train=args.train, n_valid=args.valid, seed=args.seed, size=args.size, v2=args.v2,
               anatomy_table=args.anatomy_table, workers=args.workers, max_reconstructions=args.max_reconstructions,
               **extra)
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from fvlm.data.preprocess import run_preprocess_cli

    return run_preprocess_cli(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from fvlm.config import config_for_store
    from fvlm.train import train

    cfg = config_for_store(args.data, args.config, args.overrides)
    train(cfg, data=args.data, out=args.out, resume=args.resume, device=args.device)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fvlm.zeroshot import evaluate

    evaluate(args.checkpoint, data=args.data, split=args.split, out=args.out, device=args.device,
             batch_size=args.batch_size, anatomy_table=args.anatomy_table or None)
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    from fvlm.metrics import run_metrics_cli

    return run_metrics_cli(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from fvlm.demo import run_demo_cli

    return run_demo_cli(args)


def _cmd_decompose(args: argparse.Namespace) -> int:
    from fvlm.decompose import run_decompose_cli

    return run_decompose_cli(args)


def _cmd_check_data(args: argparse.Namespace) -> int:
    from fvlm.data.check import run_check_data_cli

    return run_check_data_cli(args)


def _cmd_segment(args: argparse.Namespace) -> int:
    from fvlm.segment import run_segment_cli

    return run_segment_cli(args)


def _cmd_radchestct(args: argparse.Namespace) -> int:
    from fvlm.data.radchestct import run_radchestct_cli

    return run_radchestct_cli(args)


def _cmd_predict(args: argparse.Namespace) -> int:
    from fvlm.predict import run_predict_cli

    return run_predict_cli(args)


def _cmd_convert_official(args: argparse.Namespace) -> int:
    from fvlm.convert import run_convert_cli

    return run_convert_cli(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from fvlm.export import run_export_cli

    return run_export_cli(args)


def _cmd_embed(args: argparse.Namespace) -> int:
    from fvlm.embed import embed

    embed(args.checkpoint, data=args.data, split=args.split, out=args.out, device=args.device,
          batch_size=args.batch_size, texts=args.texts or None)
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from fvlm.probe import run_probe_cli

    return run_probe_cli(args)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from fvlm.finetune import run_finetune_cli

    return run_finetune_cli(args)


COMMANDS = {
    "synth": _cmd_synth,
    "preprocess": _cmd_preprocess,
    "train": _cmd_train,
    "eval": _cmd_eval,
    "metrics": _cmd_metrics,
    "demo": _cmd_demo,
    "decompose": _cmd_decompose,
    "check-data": _cmd_check_data,
    "segment": _cmd_segment,
    "radchestct": _cmd_radchestct,
    "predict": _cmd_predict,
    "convert-official": _cmd_convert_official,
    "embed": _cmd_embed,
    "export": _cmd_export,
    "probe": _cmd_probe,
    "finetune": _cmd_finetune,
}


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr; under torchrun only rank 0 logs below WARNING."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=getattr(logging, level) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s{f' [rank {rank}]' if 'RANK' in os.environ else ''} %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        # expected user errors: one clear line, no traceback (use --log-level DEBUG for one)
        log.debug("traceback", exc_info=True)
        log.error("%s: %s", type(e).__name__, e)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
