"""Training of the two-tower model (towers are defined in services.models.two_tower).

Losses (``loss`` setting):

- ``inbatch``: sampled softmax over the other targets of the batch, with the sampling-
  bias (logQ) correction of Yi et al. 2019: every logit is reduced by log q(item), q the
  item's frequency as a target, because frequent items are over-represented as
  negatives. Other rows with the same target item are masked.
- ``full``: softmax over every item of the catalog (the item tower runs on all items at
  every step), allowed up to ``full_softmax_max_items``.

Logits are cosine similarities divided by ``temperature``. The item id is replaced by
"unknown" with probability ``id_dropout`` so the item tower also learns to embed an item
from its features alone (item cold start). Early stopping on validation Recall@K keeps the
best epoch's weights. Determinism: a seeded torch generator and numpy shuffles, one
thread by default.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from services.models.two_tower import TwoTowerNet
from training import distributed
from training.evaluate import EmbeddingScorer, evaluate
from training.features import EvalSet, Examples, UserFeatures, Vocab


@dataclass
class TwoTowerConfig:
    dim: int = 64
    hidden: int = 128
    loss: str = "inbatch"  # "inbatch" | "full"
    temperature: float = 0.07
    lr: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 512
    epochs: int = 15
    patience: int = 2
    early_stop_k: int = 20
    id_dropout: float = 0.1
    full_softmax_max_items: int = 50_000
    seed: int = 0
    progress: bool = True
    max_steps_per_epoch: int = 0  # 0 = full epoch

    def to_params(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainHistory:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_metric: float = -math.inf
    seconds: float = 0.0


def _user_tensors(f: UserFeatures, rows: np.ndarray | slice) -> dict[str, torch.Tensor]:
    t = torch.from_numpy
    return {
        "recent": t(f.recent[rows]),
        "purchased": t(f.purchased[rows]),
        "cart": t(f.cart[rows]),
        "anchor": t(f.anchor[rows]),
        "surface": t(f.surface[rows]),
        "country": t(f.country[rows]),
        "segment": t(f.segment[rows]),
        "band": t(f.band[rows]),
    }


def encode_users(net: TwoTowerNet, f: UserFeatures, batch: int = 4096) -> np.ndarray:
    """User embeddings of feature rows, in eval mode."""
    net.eval()
    out = []
    with torch.no_grad():
        for a in range(0, len(f), batch):
            x = _user_tensors(f, slice(a, a + batch))
            aff = net.affinity_from_history(x["recent"], x["purchased"])
            out.append(net.encode_user(**x, affinity=aff).numpy())
    if not out:
        return np.zeros((0, net.dim), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


class ItemTable:
    """Feature tensors of every catalog item; ids of items without training events are
    set to "unknown" (0) so their embedding comes from features, as for a new item."""

    def __init__(self, vocab: Vocab, trained_rows: np.ndarray) -> None:
        ids = np.arange(1, vocab.n_items + 1, dtype=np.int64)
        known = np.zeros(vocab.n_items, dtype=bool)
        known[trained_rows] = True
        self.known = known
        self.ids = torch.from_numpy(np.where(known, ids, 0))
        self.cat = torch.from_numpy(vocab.item_category)
        self.price = torch.from_numpy(vocab.item_price_bucket)
        self.attrs = torch.from_numpy(vocab.item_attrs)

    def encode(
        self,
        net: TwoTowerNet,
        rows: torch.Tensor | None = None,
        id_dropout: float = 0.0,
        gen: torch.Generator | None = None,
    ) -> torch.Tensor:
        if rows is None:
            ids, cat, price, attrs = self.ids, self.cat, self.price, self.attrs
        else:
            ids, cat, price, attrs = (
                self.ids[rows],
                self.cat[rows],
                self.price[rows],
                self.attrs[rows],
            )
        if id_dropout > 0:
            drop = torch.rand(ids.shape, generator=gen) < id_dropout
            ids = torch.where(drop, torch.zeros_like(ids), ids)
        return net.encode_item(ids, cat, price, attrs)

    def all_embeddings(self, net: TwoTowerNet, batch: int = 65_536) -> np.ndarray:
        net.eval()
        with torch.no_grad():
            out = [
                self.encode(net, torch.arange(a, min(a + batch, len(self.ids)))).numpy()
                for a in range(0, len(self.ids), batch)
            ]
        return np.concatenate(out).astype(np.float32)


def new_net(vocab: Vocab, cfg: TwoTowerConfig) -> TwoTowerNet:
    fc = vocab.features
    net = TwoTowerNet(
        n_items=vocab.n_items,
        n_categories=len(vocab.categories),
        n_surfaces=len(vocab.surfaces),
        n_countries=len(vocab.countries),
        n_segments=len(vocab.segments),
        n_price_buckets=len(vocab.price_boundaries) + 1,
        attr_buckets=fc.attr_buckets,
        dim=cfg.dim,
        hidden=cfg.hidden,
        max_recent=fc.max_recent,
    )
    cat = np.concatenate([[0], vocab.item_category])
    net.item_category.copy_(torch.from_numpy(cat))
    return net


def train_two_tower(
    vocab: Vocab,
    examples: Examples,
    valid: EvalSet,
    cfg: TwoTowerConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[TwoTowerNet, ItemTable, TrainHistory]:
    """Train with early stopping on ``valid``; returns the best net and its item table.

    Under torch.distributed (see :mod:`training.distributed`) every rank trains on its
    slice of each global batch of ``batch_size`` rows and gradients are averaged, so all
    ranks end with the same weights; rank 0 evaluates and decides early stopping.
    """
    rank, world = distributed.rank_world()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 7919 * rank)
    rng = np.random.default_rng(cfg.seed)
    net = new_net(vocab, cfg)
    distributed.broadcast_parameters(net)
    items = ItemTable(vocab, np.unique(examples.target))
    n_items = vocab.n_items
    if cfg.loss not in ("inbatch", "full"):
        raise ValueError(f"loss must be 'inbatch' or 'full', not {cfg.loss!r}")
    if cfg.loss == "full" and n_items > cfg.full_softmax_max_items:
        raise ValueError(
            f"full softmax over {n_items} items exceeds full_softmax_max_items="
            f"{cfg.full_softmax_max_items}; use loss='inbatch'"
        )
    counts = np.bincount(examples.target, minlength=n_items).astype(np.float64)
    log_q = torch.from_numpy(np.log(np.maximum(counts, 1.0) / counts.sum()).astype(np.float32))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(examples.target)
    steps = math.ceil(n / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    hist = TrainHistory()
    best_state: dict[str, torch.Tensor] | None = None
    bad = 0
    t0 = time.perf_counter()
    metric = f"recall@{cfg.early_stop_k}"
    for epoch in range(cfg.epochs):
        net.train()
        perm = rng.permutation(n)
        total, seen = 0.0, 0
        bar = tqdm(
            range(steps),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress or rank != 0,
            leave=False,
            unit="batch",
        )
        te = time.perf_counter()
        for s in bar:
            rows = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size][rank::world]
            if len(rows) == 0:  # a last global batch smaller than the world
                rows = perm[s * cfg.batch_size : s * cfg.batch_size + 1]
            x = _user_tensors(examples.feats, rows)
            aff = net.affinity_from_history(x["recent"], x["purchased"])
            u = net.encode_user(**x, affinity=aff)
            tgt = torch.from_numpy(examples.target[rows])
            w = torch.from_numpy(examples.weight[rows])
            if cfg.loss == "inbatch":
                v = items.encode(net, tgt, cfg.id_dropout, gen)
                logits = u @ v.T / cfg.temperature - log_q[tgt].unsqueeze(0)
                same = tgt.unsqueeze(1) == tgt.unsqueeze(0)
                same.fill_diagonal_(False)
                logits = logits.masked_fill(same, -1e9)
                labels = torch.arange(len(rows))
            else:
                v = items.encode(net, None, cfg.id_dropout, gen)
                logits = u @ v.T / cfg.temperature
                labels = tgt
            loss = (F.cross_entropy(logits, labels, reduction="none") * w).sum() / w.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(net)
            opt.step()
            total += float(loss.detach()) * len(rows)
            seen += len(rows)
            if s % 20 == 0:
                bar.set_postfix(loss=f"{total / seen:.4f}")
        train_s = time.perf_counter() - te
        value = 0.0
        if rank == 0:
            item_emb = items.all_embeddings(net)
            user_emb = encode_users(net, valid.feats)
            m = evaluate(EmbeddingScorer(user_emb, item_emb), valid, ks=(cfg.early_stop_k,))
            value = m.get(metric, 0.0)
        value = distributed.broadcast_float(value)
        m = {metric: value}
        row = {
            "epoch": float(epoch + 1),
            "train_loss": total / max(seen, 1),
            f"epoch_valid_{metric.replace('@', '_')}": value,
            "epoch_seconds": train_s,
        }
        hist.epochs.append(row)
        if cfg.progress and rank == 0:
            tqdm.write(
                f"epoch {epoch + 1}: loss {row['train_loss']:.4f} valid {metric} "
                f"{m.get(metric, 0.0):.4f} ({train_s:.1f}s)"
            )
        if on_epoch is not None and rank == 0:
            on_epoch(epoch + 1, row)
        if m.get(metric, 0.0) > hist.best_metric:
            hist.best_metric, hist.best_epoch = m.get(metric, 0.0), epoch + 1
            best_state = copy.deepcopy(net.state_dict())
            bad = 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    # Items never seen in training keep an untrained id vector: zero it, so that any
    # caller (serving included) embeds them from features, exactly like a new item.
    with torch.no_grad():
        unseen = torch.from_numpy(np.flatnonzero(~items.known) + 1)
        net.item_id.weight[unseen] = 0.0
    net.eval()
    hist.seconds = time.perf_counter() - t0
    return net, items, hist
