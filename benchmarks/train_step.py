"""Benchmark: one fVLM training step, ours vs a straightforward baseline in the released code's structure.

Both variants use the same model weights and the same batch, in the same run:

- **ours**: token membership for all anatomies at once, one masked SDPA call for all anatomies as queries
  (keys/values projected once per volume), the loss vectorised over anatomies, each distinct text encoded
  once and padded to the longest; on CUDA bf16 autocast;
- **baseline** (released structure): MONAI's stock ViT forward (einsum attention), per-sample,
  per-anatomy Python loops with ``nn.MultiheadAttention`` and ``F.max_pool3d`` membership, a per-anatomy loss
  loop with Python-built target matrices (raw text comparison), texts really padded to 384 tokens (the
  released ``padding="max_length"``) and encoded once per anatomy per sample with all 384 positions through the
  BERT (no trimming), [CLS] state, fp32.

Timings: the *vision encoder* alone and the *text side* alone (forward + backward: ours SDPA ViT vs MONAI's einsum
ViT; ours each distinct text once, padded to the longest, vs every text of every anatomy at 384 tokens),
*pooling + loss* (forward + backward of membership, anatomy attention, projections and loss, from fixed token
levels and text features) and the *whole step* (forward, loss, backward, AdamW step); the parts credit the
whole-step difference to its causes.
Reports min and median over repeats, the variants interleaved (timings swing 2-3x on a shared machine),
samples/s, and peak GPU memory on CUDA. A correctness check compares the two losses in eval mode.

    python benchmarks/train_step.py                       # CPU, demo preset dims, batch 14, A = 4
    python benchmarks/train_step.py --device cuda         # GPU: paper preset (ViT-B, BERT-base size), batch 14
    python benchmarks/train_step.py --dry-run             # the CUDA-mode code path on CPU with tiny dims
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import machine as describe_machine  # noqa: E402  (sibling module of the benchmarks)
from monai.networks.nets import ViT

from fvlm.config import Config, load_config
from fvlm.io import atomic_write_text
from fvlm.loss import anatomy_contrastive_loss
from fvlm.model import FVLM, param_groups
from fvlm.model.anatomy_pooling import anatomy_attention, project_anatomies, token_membership
from fvlm.model.text_encoder import tokenize_unique
from fvlm.text import normal_template, text_id

log = logging.getLogger("benchmarks.train_step")
ROOT = Path(__file__).resolve().parent
ANATOMIES = ("lung", "heart", "esophagus", "aorta")
RELEASED_MAX_LENGTH = 384
WORDS = ("mild moderate severe bilateral left right upper lower lobe nodule opacity ground glass consolidation "
         "effusion pleural thickening calcified plaque wall aortic diameter ectatic cardiomegaly pericardial "
         "hiatal hernia emphysema centrilobular atelectasis bronchiectasis septal fibrotic sequela mosaic pattern "
         "peribronchial linear subsegmental segment millimeters measuring approximately noted observed").split()
NORMAL_FINDINGS = ("Lung parenchyma is clear.", "Heart contour and size are normal.", "Esophagus is normal.",
                   "Thoracic aorta diameter is normal.")


# ----------------------------------------------------------------------------------------------- data
def make_batch(b: int, crop: tuple[int, int, int], tokenizer, max_length: int, baseline_max_length: int,
               seed: int = 0) -> dict:
    """Random image in [0, 1], masks with 4 ellipsoid blob anatomies, random report-like anatomy texts."""
    g = torch.Generator().manual_seed(seed)
    d, h, w = crop
    zz, yy, xx = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    mask = torch.zeros(b, d, h, w, dtype=torch.uint8)
    for i in range(b):
        for k in range(len(ANATOMIES)):
            c = [float(torch.empty(1).uniform_(0.3 * s, 0.7 * s, generator=g)) for s in (d, h, w)]
            r = [float(torch.empty(1).uniform_(0.1 * s, 0.22 * s, generator=g)) for s in (d, h, w)]
            blob = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1
            mask[i][blob] = k + 1
    texts, normal = [], []
    for _ in range(b):
        row, nrow = [], []
        for k, name in enumerate(ANATOMIES):
            u = float(torch.rand(1, generator=g))
            if u < 0.35:
                row.append(normal_template(name))
                nrow.append(True)
            elif u < 0.6:
                row.append(NORMAL_FINDINGS[k])
                nrow.append(True)
            else:
                n = int(torch.randint(5, 60, (1,), generator=g))
                row.append(" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n,), generator=g)) + ".")
                nrow.append(False)
        texts.append(row)
        normal.append(nrow)
    ours = tokenize_unique(tokenizer, texts, max_length)
    flat = [t for row in texts for t in row]
    base = tokenizer(flat, padding="max_length", truncation=True, max_length=baseline_max_length, return_tensors="pt")
    a = len(ANATOMIES)
    return {
        "image": torch.rand(b, 1, d, h, w, generator=g), "mask": mask,
        "valid": torch.ones(b, a, dtype=torch.bool), "is_normal": torch.tensor(normal),
        "text_id": torch.tensor([[text_id(t) for t in row] for row in texts]), "texts": texts,
        "text_index": ours["text_index"], "text_input_ids": ours["input_ids"],
        "text_attention_mask": ours["attention_mask"],
        "base_input_ids": base["input_ids"].view(b, a, -1),
        "base_attention_mask": base["attention_mask"].view(b, a, -1),
    }


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------- baseline
def baseline_pool(model: FVLM, levels: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Released structure: per sample, per anatomy: max-pool membership, nn.MultiheadAttention, projection."""
    b = mask.shape[0]
    patch = model.patch_size
    feats = []
    for i in range(b):
        row = []
        for k in range(model.num_anatomies):
            member = F.max_pool3d((mask[i] == k + 1).float()[None, None], kernel_size=patch, stride=patch)
            sel = member.flatten() > 0
            if not sel.any():
                row.append(levels[0].new_zeros(model.vision_projs[k].out_features))
                continue
            keys = torch.cat([x[i, sel] for x in levels])[None]
            pooled, _ = model.attention(model.query_tokens[:, k:k + 1], keys, keys, need_weights=False)
            row.append(F.normalize(model.vision_projs[k](pooled[0, 0]), dim=-1))
        feats.append(torch.stack(row))
    return torch.stack(feats)


def baseline_loss(image_features: torch.Tensor, text_features: torch.Tensor, valid: torch.Tensor,
                  is_normal: torch.Tensor, texts: list[list[str]], temperature: torch.Tensor) -> torch.Tensor:
    """Released structure: per anatomy, select valid samples, build targets with Python loops on raw texts."""
    total = image_features.new_zeros(())
    valid_l, normal_l = valid.tolist(), is_normal.tolist()
    for k in range(image_features.shape[1]):
        idx = [i for i in range(len(texts)) if valid_l[i][k]]
        if len(idx) < 2 or all(normal_l[i][k] for i in idx):
            continue
        n = len(idx)
        s = torch.zeros(n, n, device=image_features.device)
        for p, i in enumerate(idx):
            for q, j in enumerate(idx):
                if p == q or (normal_l[i][k] and normal_l[j][k]) or texts[i][k] == texts[j][k]:
                    s[p, q] = 1.0
        if torch.all(s == 1):
            continue
        s = s / s.sum(dim=1, keepdim=True)
        img = torch.stack([image_features[i, k] for i in idx])
        txt = torch.stack([text_features[i, k] for i in idx])
        sim = img @ txt.T / temperature
        i2t = -(F.log_softmax(sim, dim=1) * s).sum(1).mean()
        t2i = -(F.log_softmax(sim.T, dim=1) * s).sum(1).mean()
        total = total + (i2t + t2i) / 2
    return total


def baseline_forward_loss(model: FVLM, batch: dict) -> torch.Tensor:
    """Whole forward of the released structure: MONAI ViT forward, pooling loop, per-anatomy text encoding."""
    vit = model.visual_encoder
    final, hidden = ViT.forward(vit, batch["image"])  # stock MONAI forward (einsum attention)
    levels = [hidden[lv - 1] for lv in vit.levels] + [final]
    image_features = baseline_pool(model, levels, batch["mask"])
    rows = []
    for k in range(model.num_anatomies):  # one BERT call per anatomy over all 384 padded positions (as released)
        out = model.text_encoder(input_ids=batch["base_input_ids"][:, k],
                                 attention_mask=batch["base_attention_mask"][:, k])
        cls = out.last_hidden_state[:, 0]  # [CLS], as released
        rows.append(F.normalize(model.text_proj(cls), dim=-1))
    text_features = torch.stack(rows, dim=1)
    return baseline_loss(image_features, text_features, batch["valid"], batch["is_normal"], batch["texts"],
                         model.temperature())


# ----------------------------------------------------------------------------------------------- ours
def ours_pool_loss(model: FVLM, levels: list[torch.Tensor], text_features: torch.Tensor, batch: dict) -> torch.Tensor:
    membership = token_membership(batch["mask"], model.num_anatomies, model.patch_size)
    pooled, present = anatomy_attention(levels, membership, model.query_tokens, model.attention)
    image_features = project_anatomies(pooled, present, model.vision_projs)
    return anatomy_contrastive_loss(image_features, text_features, batch["valid"], batch["is_normal"],
                                    batch["text_id"], model.temperature())["loss"]


def ours_forward_loss(model: FVLM, batch: dict) -> torch.Tensor:
    out = model(batch)
    return anatomy_contrastive_loss(out["image_features"], out["text_features"], batch["valid"], batch["is_normal"],
                                    batch["text_id"], out["temperature"], anatomy_names=ANATOMIES)["loss"]


# --------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variants(fns: dict, device: torch.device, repeats: int, warmup: int = 2, setup=None) -> dict:
    """Time each variant ``repeats`` times, interleaved (ours, baseline, ours, ...) so that load changes on a
    shared machine hit all variants alike; ``setup`` runs untimed before each call.

    Returns per variant: seconds per call (min, median, all), peak CUDA memory, or ``{"error": "out of
    memory"}`` if the variant does not fit the GPU (the others still run).
    """
    times: dict = {name: [] for name in fns}
    peak: dict = dict.fromkeys(fns, 0.0)
    failed: set = set()
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if name in failed:
                continue
            if setup:
                setup()
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                t0 = time.perf_counter()
                fn()
                _sync(device)
                dt = time.perf_counter() - t0
            except torch.cuda.OutOfMemoryError:
                log.warning("%s: out of GPU memory", name)
                failed.add(name)
                torch.cuda.empty_cache()
                continue
            if i >= warmup:
                times[name].append(dt)
                if device.type == "cuda":
                    peak[name] = max(peak[name], torch.cuda.max_memory_allocated() / 2**30)
    out = {}
    for name in fns:
        if name in failed:
            out[name] = {"error": "out of memory"}
            continue
        t = times[name]
        out[name] = {"min_s": min(t), "median_s": statistics.median(t), "times_s": t}
        if device.type == "cuda":
            out[name]["peak_memory_gib"] = peak[name]
    return out


#: the CPU run's model: fixed here (the dims of the demo preset when the committed numbers were first taken),
#: so that the benchmark measures the same model whatever the demo preset is tuned to later; a plain BERT text
#: side (no frozen layers, no prefix cache: those are model choices, not faster code)
CPU_DIMS = ["data.crop_size=[48,96,128]", "data.input_windows=[]", "model.vision.width=192", "model.vision.depth=6",
            "model.vision.heads=3", "model.vision.mlp_dim=768", "model.vision.levels=[2,4,5]",
            "model.vision.stem_channels=[]", "model.text.max_length=128", "model.text.pooling=cls",
            "model.text.freeze_layers=0", "model.text.cache_frozen=0", "model.text.num_layers=0"]


def build(args: argparse.Namespace) -> tuple[Config, FVLM, torch.device]:
    device = torch.device(args.device)
    cfg = load_config(args.config, args.overrides)
    if cfg.model.vision.pretrained and not Path(cfg.model.vision.pretrained).exists():
        log.info("no MAE file %s: random ViT init (timing only)", cfg.model.vision.pretrained)
        cfg.model.vision.pretrained = ""
    t = cfg.model.text
    if t.random_init is None and not t.pretrained.startswith("builtin:") and not Path(t.pretrained).exists():
        # CXR-BERT is a user download: a random BERT of its size (BERT-base) costs the same per token
        log.info("no text model at %s: random BERT-base with the MiniLM vocabulary (timing only)", t.pretrained)
        t.random_init = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                         "intermediate_size": 3072, "max_position_embeddings": 512}
        t.tokenizer, t.pretrained = "builtin:minilm", "builtin:minilm"
    torch.manual_seed(0)
    model = FVLM(cfg, num_anatomies=len(ANATOMIES)).to(device)
    return cfg, model, device


def machine(device: torch.device) -> dict:
    return describe_machine(device)


def run(args: argparse.Namespace) -> dict:
    cfg, model, device = build(args)
    amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "off")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == "bf16" else nullcontext
    base_len = min(RELEASED_MAX_LENGTH, model.text_encoder.config.max_position_embeddings)
    batch = to_device(make_batch(args.batch, cfg.data.crop_size, model.tokenizer, cfg.model.text.max_length,
                                 base_len), device)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    a = len(ANATOMIES)
    log.info("%s, config %s, batch %d, A = %d, crop %s, tokens/volume %d, width %d; ours amp=%s; "
             "texts: %d distinct of %d, ours padded to %d tokens, baseline to %d",
             device, args.config, args.batch, a, cfg.data.crop_size, len(model.visual_encoder.position_embedding(
                 model.visual_encoder.grid_size)[0]), cfg.model.vision.width, amp, batch["text_input_ids"].shape[0],
             args.batch * a, batch["text_input_ids"].shape[1], base_len)

    # correctness: both structures give the same loss (eval mode: no dropout; fp32)
    model.eval()
    with torch.no_grad():
        ours_loss, base_loss = ours_forward_loss(model, batch).item(), baseline_forward_loss(model, batch).item()
    model.train()
    log.info("eval-mode loss: ours %.6f, baseline %.6f", ours_loss, base_loss)

    # pooling + loss only, from fixed token levels and text features (leaves, so backward stops there)
    with torch.no_grad():
        levels = [x.detach() for x in model.visual_encoder(batch["image"])]
        text_features = model.encode_text(batch["text_input_ids"], batch["text_attention_mask"])[batch["text_index"]]
    levels = [x.requires_grad_(True) for x in levels]
    text_features = text_features.detach().requires_grad_(True)

    def pool_ours():
        with autocast():
            loss = ours_pool_loss(model, levels, text_features, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def pool_base():
        image_features = baseline_pool(model, levels, batch["mask"])
        loss = baseline_loss(image_features, text_features, batch["valid"], batch["is_normal"], batch["texts"],
                             model.temperature())
        loss.backward()
        model.zero_grad(set_to_none=True)

    opt_ours = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=1e-5)
    opt_base = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=1e-5)

    def reset():
        model.load_state_dict(snapshot)  # same weights for every step of both variants (untimed)

    def step(forward_loss, opt, ctx):
        def fn():
            with ctx():
                loss = forward_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return fn

    # the step's two encoders alone (forward + backward), to credit the whole-step difference to its parts
    def vision_ours():
        with autocast():
            out = model.visual_encoder(batch["image"])
        sum(x.float().mean() for x in out).backward()
        model.zero_grad(set_to_none=True)

    def vision_base():
        final, hidden = ViT.forward(model.visual_encoder, batch["image"])
        (sum(hidden[lv - 1].mean() for lv in model.visual_encoder.levels) + final.mean()).backward()
        model.zero_grad(set_to_none=True)

    def text_ours():
        with autocast():
            feats = model.encode_text(batch["text_input_ids"], batch["text_attention_mask"])[batch["text_index"]]
        feats.float().sum().backward()
        model.zero_grad(set_to_none=True)

    def text_base():
        rows = []
        for k in range(model.num_anatomies):
            out = model.text_encoder(input_ids=batch["base_input_ids"][:, k],
                                     attention_mask=batch["base_attention_mask"][:, k])
            rows.append(F.normalize(model.text_proj(out.last_hidden_state[:, 0]), dim=-1))
        torch.stack(rows, dim=1).sum().backward()
        model.zero_grad(set_to_none=True)

    results: dict = {}
    load_before = os.getloadavg()
    for name, ours_fn, base_fn, setup in (("vision", vision_ours, vision_base, None),
                                          ("text", text_ours, text_base, None),
                                          ("pool_loss", pool_ours, pool_base, None),
                                          ("step", step(ours_forward_loss, opt_ours, autocast),
                                           step(baseline_forward_loss, opt_base, nullcontext), reset)):
        timed = time_variants({"ours": ours_fn, "baseline": base_fn}, device, args.repeats, setup=setup)
        r_ours, r_base = timed["ours"], timed["baseline"]
        results[name] = {"ours": r_ours, "baseline": r_base}
        if "error" in r_ours or "error" in r_base:
            log.info("%-9s ours %s, baseline %s", name, r_ours, r_base)
            continue
        for r in (r_ours, r_base):
            r["samples_per_s_median"] = args.batch / r["median_s"]
            r["samples_per_s_best"] = args.batch / r["min_s"]
        results[name].update(speedup_median=r_base["median_s"] / r_ours["median_s"],
                             speedup_min=r_base["min_s"] / r_ours["min_s"])
        log.info("%-9s ours %.3f s (min %.3f), baseline %.3f s (min %.3f): speed-up %.2fx (min %.2fx)%s", name,
                 r_ours["median_s"], r_ours["min_s"], r_base["median_s"], r_base["min_s"],
                 results[name]["speedup_median"], results[name]["speedup_min"],
                 f"; peak GPU memory ours {r_ours['peak_memory_gib']:.1f} GiB, baseline "
                 f"{r_base['peak_memory_gib']:.1f} GiB" if device.type == "cuda" else "")
    return {
        "benchmark": "train_step", "machine": machine(device), "device": str(device),
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "setting": {"config": args.config, "overrides": args.overrides, "batch": args.batch, "anatomies": a,
                    "crop": list(cfg.data.crop_size),
                    "vision": {"width": cfg.model.vision.width, "depth": cfg.model.vision.depth,
                               "patch": list(cfg.model.vision.patch_size)},
                    "text_hidden": model.text_encoder.config.hidden_size,
                    "text_layers": model.text_encoder.config.num_hidden_layers,
                    "ours_amp": amp, "baseline_amp": "off", "repeats": args.repeats,
                    "distinct_texts": int(batch["text_input_ids"].shape[0]),
                    "ours_text_tokens": int(batch["text_input_ids"].shape[1]), "baseline_text_tokens": base_len},
        "check": {"eval_loss_ours": ours_loss, "eval_loss_baseline": base_loss,
                  "abs_diff": abs(ours_loss - base_loss)},
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--config", default=None, help="preset (default: demo on CPU, paper_vitb on CUDA)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override (section.key=value); the CPU default pins CPU_DIMS first")
    p.add_argument("--batch", type=int, default=14)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                   help="ours: bf16 autocast (auto = on CUDA only); the baseline is always fp32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/train_step[_cuda].json)")
    p.add_argument("--dry-run", action="store_true",
                   help="exercise the CUDA-mode path (bf16 autocast) on CPU with tiny dims; writes no JSON by default")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dry_run:
        args.config, args.batch, args.repeats = args.config or "tiny", min(args.batch, 4), 1
        args.amp = "bf16" if args.amp == "auto" else args.amp
    if args.config is None:
        args.config = "paper_vitb" if args.device == "cuda" else "demo"
        if args.device == "cpu" and not args.dry_run:
            args.overrides = CPU_DIMS + args.overrides
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("--device cuda: no CUDA device available")
        return 1
    result = run(args)
    out = args.out or (None if args.dry_run else
                       str(ROOT / "results" / ("train_step_cuda.json" if args.device == "cuda" else "train_step.json")))
    if out:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
