"""Anatomy-wise contrastive loss with dual false-negative reduction (the released fVLM rule).

For each anatomy k, over the global batch (all ranks):

1. only samples where k is *valid* (intact in the crop and with a text) take part;
2. k enters the step only if at least one valid sample of k is abnormal, at least 2 are valid, and the
   target matrix is not uniform (all pairs positive: nothing to contrast);
3. targets S (N x N): identity, plus 1 where both samples are normal (reduction a), plus 1 where the texts
   are identical (reduction b, equal ``text_id``); the diagonal counted once; rows normalised to sum 1;
4. loss_k = (CE(softmax(I T^T / temp), S) + CE(softmax(T I^T / temp), S)) / 2, soft-target cross entropy
   averaged over the valid rows.

Optional co-teaching (``loss.co_teaching``, :mod:`fvlm.coteach`): the rows of abnormal samples are softened
with a peer model's predicted similarities, ``S_i <- (1 - alpha) S_i + alpha P_i`` (see
:func:`co_teaching_targets` and docs/co-teaching.md).

The total is the sum over anatomies. Everything is vectorised over anatomies with masks (static shapes
(A, N, N)); a pure function of tensors (no strings, tokenizer or numpy).

Distributed training: the features of all ranks are gathered with fixed-shape ``all_gather``
(:func:`fvlm.distributed.gather_features`); the local slice carries the gradient. The returned loss is the
global-batch loss, identical on every rank, and always connected to the graph (every rank runs the same
collectives and calls backward, so DDP never hangs, even when a rank has no valid anatomy).
DDP *averages* gradients over ranks, so the training loop back-propagates ``loss * world_size``: the
gradients then equal those of one process on the concatenated batch. The temperature is used whole on every
rank (not through per-rank features), so its gradient is scaled by 1 / world_size inside this function to
make the same ``* world_size`` rule exact for it too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fvlm.distributed import gather_features, is_distributed, world_size


def _positives(is_normal: torch.Tensor, text_id: torch.Tensor, normal_positives: bool,
               same_text_positives: bool) -> torch.Tensor:
    """Unnormalised positive pairs, bool (..., N, N): identity | both normal | identical text id."""
    n = is_normal.shape[-1]
    pos = torch.eye(n, dtype=torch.bool, device=is_normal.device).expand(*is_normal.shape, n)
    if normal_positives:
        normal = is_normal.bool()
        pos = pos | (normal[..., :, None] & normal[..., None, :])
    if same_text_positives:
        pos = pos | (text_id[..., :, None] == text_id[..., None, :])
    return pos


def false_negative_targets(is_normal: torch.Tensor, text_id: torch.Tensor, normal_positives: bool = True,
                           same_text_positives: bool = True) -> torch.Tensor:
    """Soft targets of the released dual false-negative reduction.

    Args:
        is_normal: bool (N,) (or (..., N)); text_id: int64, same shape (equal ids = identical texts).
        normal_positives: both-normal pairs are positives. same_text_positives: identical-text pairs are.
    Returns:
        float32 (N, N) (or (..., N, N)): identity + both-normal + identical-text, each pair counted once,
        rows normalised to sum 1 (identity only when both switches are off).
    """
    if is_normal.shape != text_id.shape:
        raise ValueError(f"is_normal {tuple(is_normal.shape)} and text_id {tuple(text_id.shape)} differ in shape")
    pos = _positives(is_normal, text_id, normal_positives, same_text_positives).float()
    return pos / pos.sum(dim=-1, keepdim=True)


def _masked_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Row softmax over valid columns (A, N, N); rows and columns of invalid samples are 0."""
    masked = logits.masked_fill(~valid[:, None, :], float("-inf")).masked_fill(~valid[:, :, None], 0.0)
    return F.softmax(masked, dim=-1).masked_fill(~(valid[:, :, None] & valid[:, None, :]), 0.0)


def co_teaching_targets(targets: torch.Tensor, peer_logits: torch.Tensor, valid: torch.Tensor,
                        is_normal: torch.Tensor, alpha: float) -> torch.Tensor:
    """Soften the target rows of abnormal samples with a peer model's predicted similarities.

    ``T_i = (1 - alpha) * S_i + alpha * softmax_j(peer_logits_ij)`` (softmax over the valid columns) for every
    valid row i whose sample is abnormal; other rows keep ``S_i``. Rows still sum to 1.

    Args:
        targets: (A, N, N) plain targets S (rows sum to 1 over valid columns).
        peer_logits: (A, N, N) the peer's similarity / temperature in the same direction (image->text or
            text->image); no gradient flows into it.
        valid, is_normal: bool (A, N). alpha: weight of the peer, in [0, 1]; 0 returns ``targets``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"co-teaching alpha must lie in [0, 1], got {alpha}")
    peer = _masked_softmax(peer_logits.detach().float(), valid)
    soft = (1.0 - alpha) * targets + alpha * peer
    rows = (valid & ~is_normal.bool())[:, :, None]
    return torch.where(rows, soft, targets)


def _scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Same value as ``x``; gradient multiplied by ``scale``."""
    return x.detach() + (x - x.detach()) * scale


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid rows of -sum_j S_ij log softmax_j(logits_i), restricted to valid columns.

    logits, targets: (A, N, N); valid: bool (A, N). Returns (A,); 0 where no row is valid. Invalid rows and
    columns are masked so that nothing is NaN/inf (inactive anatomies still take part in the graph).
    """
    masked = logits.masked_fill(~valid[:, None, :], float("-inf")).masked_fill(~valid[:, :, None], 0.0)
    logp = F.log_softmax(masked, dim=-1).masked_fill(~(valid[:, :, None] & valid[:, None, :]), 0.0)
    rows = -(targets * logp).sum(dim=-1) * valid
    return rows.sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)


def anatomy_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    valid: torch.Tensor,
    is_normal: torch.Tensor,
    text_id: torch.Tensor,
    temperature: torch.Tensor | float,
    *,
    normal_positives: bool = True,
    same_text_positives: bool = True,
    anatomy_names: Sequence[str] | None = None,
    gather: bool = True,
    peer_image_features: torch.Tensor | None = None,
    peer_text_features: torch.Tensor | None = None,
    peer_temperature: torch.Tensor | float | None = None,
    co_teaching_alpha: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Anatomy-wise soft-target InfoNCE over the global batch.

    Args:
        image_features, text_features: (B, A, E), L2-normalised (rows that are not valid may hold anything
            finite).
        valid: bool (B, A); is_normal: bool (B, A); text_id: int64 (B, A).
        temperature: 0-d tensor (or float); logits = cosine similarity / temperature.
        normal_positives, same_text_positives: the two false-negative reductions.
        anatomy_names: A names for the per-anatomy terms (default "0", "1", ...).
        gather: gather all ranks' samples when a process group of more than one process is active.
        peer_image_features, peer_text_features, peer_temperature: co-teaching: the peer model's features
            (B, A, E) of the same batch and its temperature (no gradient); gathered like the main features.
        co_teaching_alpha: weight of the peer's similarities in the targets of abnormal samples.
    Returns:
        ``"loss"``: 0-d, the sum over active anatomies (global batch; same value on every rank);
        ``"loss/{name}"``: 0-d detached term of each anatomy (0 if skipped);
        ``"n/{name}"``: int64 0-d, valid samples of the anatomy in the global batch (0 if skipped).
    """
    if image_features.ndim != 3 or image_features.shape != text_features.shape:
        raise ValueError(f"expected image and text features (B, A, E) of one shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    b, a, _ = image_features.shape
    for name, t in (("valid", valid), ("is_normal", is_normal), ("text_id", text_id)):
        if tuple(t.shape) != (b, a):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected (B, A) = {(b, a)}")
    names = [str(k) for k in range(a)] if anatomy_names is None else list(anatomy_names)
    if len(names) != a:
        raise ValueError(f"{len(names)} anatomy names for {a} anatomies")
    if not torch.is_tensor(temperature):
        temperature = torch.tensor(float(temperature), device=image_features.device)
    peer = peer_image_features is not None
    if peer and (peer_text_features is None or peer_temperature is None
                 or peer_image_features.shape != image_features.shape
                 or peer_text_features.shape != text_features.shape):
        raise ValueError("co-teaching needs peer image and text features of the main features' shape and a "
                         "peer temperature")
    local = image_features.sum() + text_features.sum()
    temp = temperature
    if gather and is_distributed():
        extra = (peer_image_features.detach(), peer_text_features.detach()) if peer else ()
        image_features, text_features, valid, is_normal, text_id, *extra = gather_features(
            image_features, text_features, valid, is_normal, text_id, *extra)
        if peer:
            peer_image_features, peer_text_features = extra
        temp = _scale_grad(temperature, 1.0 / world_size())

    # anatomies first: (A, N, ...); the loss is computed in float32 whatever the autocast dtype
    img = image_features.float().transpose(0, 1)
    txt = text_features.float().transpose(0, 1)
    v = valid.bool().T
    normal = is_normal.bool().T
    ids = text_id.T
    pair = v[:, :, None] & v[:, None, :]
    pos = _positives(normal, ids, normal_positives, same_text_positives) & pair
    n_valid = v.sum(dim=1)
    n_abnormal = (v & ~normal).sum(dim=1)
    uniform = (pos == pair).all(dim=-1).all(dim=-1)  # every valid pair positive: nothing to contrast
    active = (n_abnormal >= 1) & (n_valid >= 2) & ~uniform
    targets = pos.float() / pos.sum(dim=-1, keepdim=True).clamp(min=1)

    # float32 even inside an autocast region (bmm would otherwise run in bf16: logits up to 1 / temp_min)
    with torch.autocast(img.device.type, enabled=False):
        logits = torch.bmm(img, txt.transpose(1, 2)) / temp.float()  # (A, N, N): image i vs text j
        targets_i2t = targets_t2i = targets
        if peer and co_teaching_alpha > 0:
            p_img = peer_image_features.detach().float().transpose(0, 1)
            p_txt = peer_text_features.detach().float().transpose(0, 1)
            p_logits = torch.bmm(p_img, p_txt.transpose(1, 2)) / torch.as_tensor(peer_temperature).detach().float()
            targets_i2t = co_teaching_targets(targets, p_logits, v, normal, co_teaching_alpha)
            targets_t2i = co_teaching_targets(targets, p_logits.transpose(1, 2), v, normal, co_teaching_alpha)
        i2t = _soft_cross_entropy(logits, targets_i2t, v)
        t2i = _soft_cross_entropy(logits.transpose(1, 2), targets_t2i, v)
    terms = torch.where(active, (i2t + t2i) / 2, torch.zeros_like(i2t))
    # 0 * (local features, temperature): the graph always reaches every input, even with no active anatomy
    loss = terms.sum() + 0.0 * (local.float() + temperature.float())
    out: dict[str, torch.Tensor] = {"loss": loss}
    counts = n_valid * active
    for k, name in enumerate(names):
        out[f"loss/{name}"] = terms[k].detach()
        out[f"n/{name}"] = counts[k]
    return out
