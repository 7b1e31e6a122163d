"""Training of the ranker (``mercato-ranker``): candidates from the two-tower, labels from
what each customer did next, features the ranking service can compute from a Rank
request, a small MLP with a listwise loss, evaluation against the retrieval order.

Windows (a time split of the same data and options as ``mercato train retrieval``, so
the split signature is the two-tower's)::

    train  ─────────────── t1 ───── valid ───── t2 ───── test ─────▶
    two-tower fit        │ ranker fit / early-stop │ held-out evaluation
                         │ (state at t1, labels    │ (state at t2, truth =
                         │  = events in valid)     │  purchases in test)

- The two-tower is trained on ``train`` in the same run (default; same code and options as
  ``mercato train retrieval``), or loaded from the registry by alias when its bundle was
  trained on the same data and split (``two_tower="registry"``). Training it here is the
  default because the ranker's label windows must be *after* the two-tower's training
  data, which a registered version does not guarantee (its split signature is checked).
- For every customer with history at the cutoff, the two-tower's top ``candidates``
  items (history excluded, as in the retrieval evaluation) are the list; each candidate's
  label is the strongest thing the customer did with it in the next window (view 1, add
  to cart 2, purchase 4 by default).
- Features: :func:`services.models.ranker.build_features` (shared with serving), from a
  profile-like view of the customer at the cutoff (recent items with times, cart,
  time-decayed category affinity as the profile service computes it, mean unit price).
- Model: :class:`services.models.ranker.RankerNet`, wide & deep over standardised
  features, initialised to rank exactly by the retrieval score; trained with a listwise
  softmax cross-entropy (ListNet top-1) or pointwise weighted BCE; early stopping on
  validation NDCG@10 of a held-out 20 % of the customers of the fit window. The
  untrained model is "epoch 0": best epoch 0 means no epoch beat the retrieval order on
  validation and the exported model ranks as retrieval does.
- Evaluation on the test window: NDCG@K / Recall@K of the ranker order and of the
  retrieval order over the same candidate lists, with the retrieval evaluation's
  definitions (binary gain on target events of items new to the customer; IDCG over
  all of them, so a list cannot reach 1 when truth items were not retrieved).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import pandas as pd
import scipy.sparse as sp

from services.common.threads import configure_threads
from services.models.ranker import (
    FEATURES,
    FORMAT_VERSION,
    MODEL_NAME,
    MODEL_TYPE,
    N_FEATURES,
    CandidateDetails,
    ItemTable,
    RankerBundle,
    RankerNet,
    RankerQuery,
    build_features,
)
from services.models.registry import BUNDLE_ARTIFACT_PATH
from training.data import RetailData, Split
from training.evaluate import metrics_from_ranking, top_k
from training.features import (
    Vocab,
    build_eval_set,
    build_vocab,
    category_affinities,
    encode_events,
    walk_history,
)
from training.pipeline import TrainConfig, load_data, make_split

DEFAULT_LABEL_WEIGHTS = {"view": 1.0, "cart": 2.0, "purchase": 4.0, "rating": 1.0}
RECENT_LIMIT = 50
GATE_METRIC = "valid_ndcg_10"


@dataclass
class RankerConfig:
    """One ranker training run; ``retrieval`` holds the data, split and two-tower options
    exactly as ``mercato train retrieval`` takes them."""

    retrieval: TrainConfig = field(default_factory=TrainConfig)
    two_tower: str = "train"  # "train" | "registry"
    two_tower_model: str = "mercato-two-tower"
    two_tower_alias: str = "champion"
    candidates: int = 50
    hidden: tuple[int, ...] = (64, 32)
    loss: str = "listwise"  # "listwise" | "pointwise"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    epochs: int = 30
    patience: int = 5
    batch_lists: int = 128
    early_stop_k: int = 10
    early_stop_on: str = "truth"  # "truth" (purchase NDCG, as evaluated) | "labels" (graded)
    ks: tuple[int, ...] = (10, 20)
    label_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LABEL_WEIGHTS))
    valid_user_frac: float = 0.2
    max_users: int = 0  # cap on customers per window (0 = all)
    popularity_days: float = 28.0
    trend_days: float = 7.0
    smoke_rows: int = 32
    seed: int = 0
    threads: int = 1
    progress: bool = True
    tracking_uri: str = ""  # "" = services.common.settings.default_tracking_uri()
    artifact_root: str = ""
    experiment: str = "mercato-ranker"
    model_name: str = MODEL_NAME
    alias: str = "challenger"
    register: bool = True
    run_name: str = ""

    def params(self) -> dict[str, Any]:
        out = {f"retrieval.{k}": v for k, v in self.retrieval.params().items()}
        for k, v in asdict(self).items():
            if k == "retrieval":
                continue
            out[k] = json.dumps(v) if isinstance(v, dict | list | tuple) else v
        return out


# --------------------------------------------------------------------------- lists


@dataclass
class RankLists:
    """Candidate lists of one window: one row per customer, ``N`` candidates each."""

    users: list[str]
    rows: np.ndarray  # [U, N] item rows (-1 = padding)
    retrieval: np.ndarray  # [U, N] retrieval scores
    x: np.ndarray  # [U, N, F] features
    labels: np.ndarray  # [U, N] graded labels from the next window
    truth: sp.csr_matrix  # [U, n_items] target events on items new to the customer
    mask: np.ndarray  # [U, N] True for real candidates

    def __len__(self) -> int:
        return len(self.users)

    def take(self, idx: np.ndarray) -> RankLists:
        return RankLists(
            users=[self.users[i] for i in idx],
            rows=self.rows[idx],
            retrieval=self.retrieval[idx],
            x=self.x[idx],
            labels=self.labels[idx],
            truth=self.truth[idx],
            mask=self.mask[idx],
        )


def category_transitions(
    history: pd.DataFrame, vocab: Vocab, min_p: float = 0.005
) -> dict[str, dict[str, float]]:
    """P(next category b | category a) over consecutive events of a session that change
    category (a != b): complements (phone -> phone case) and common paths."""
    cat_names = np.asarray(vocab.categories, dtype=object)[vocab.item_category]
    h = pd.DataFrame(
        {
            "u": history["user_id"].to_numpy(),
            "s": history["session_id"].to_numpy(),
            "ts": history["ts"].to_numpy(),
            "c": cat_names[history["item_id"].map(vocab.item_row).to_numpy(np.int64)],
        }
    ).sort_values(["u", "s", "ts"], kind="stable")
    same = (h["u"].to_numpy()[1:] == h["u"].to_numpy()[:-1]) & (
        h["s"].to_numpy()[1:] == h["s"].to_numpy()[:-1]
    )
    a, b = h["c"].to_numpy()[:-1], h["c"].to_numpy()[1:]
    keep = same & (a != b) & (a != "") & (b != "")
    counts = pd.DataFrame({"a": a[keep], "b": b[keep]}).groupby(["a", "b"]).size()
    out: dict[str, dict[str, float]] = {}
    totals = counts.groupby(level=0).sum()
    for (ca, cb), n in counts.items():
        p = float(n) / float(totals[ca])
        if p >= min_p:
            out.setdefault(str(ca), {})[str(cb)] = p
    return out


def item_table_at(
    history: pd.DataFrame, vocab: Vocab, now: float, popularity_days: float, trend_days: float
) -> ItemTable:
    """Popularity and trend of every catalog item from the interactions before ``now``."""
    rows = history["item_id"].map(vocab.item_row).to_numpy(np.int64)
    ts = history["ts"].to_numpy(np.float64)
    n = vocab.n_items
    if (ts == 0).all():  # no timestamps: all history counts, no trend
        long_c = np.bincount(rows, minlength=n).astype(np.float64)
        short_c = long_c * (trend_days / popularity_days)
    else:
        long_c = np.bincount(rows[ts >= now - popularity_days * 86_400], minlength=n).astype(
            np.float64
        )
        short_c = np.bincount(rows[ts >= now - trend_days * 86_400], minlength=n).astype(np.float64)
    short_rate = short_c / trend_days
    long_rate = long_c / popularity_days
    return ItemTable(
        item_ids=list(vocab.item_ids),
        category=[vocab.categories[c] for c in vocab.item_category],
        price=vocab.item_price.astype(np.float64),
        popularity=np.log1p(long_c),
        trend=np.log((short_rate + 1.0) / (long_rate + 1.0)),
        transitions=category_transitions(history, vocab),
    )


def user_queries(
    history: pd.DataFrame, users: list[str], vocab: Vocab, now: float, cart_rows: np.ndarray
) -> list[RankerQuery]:
    """Profile-like view of each customer at ``now`` (what a Rank request carries)."""
    h = history[history["user_id"].isin(set(users))]
    last = (
        h.groupby(["user_id", "item_id"], sort=False)["ts"]
        .max()
        .reset_index()
        .sort_values(["user_id", "ts", "item_id"], ascending=[True, False, True], kind="stable")
    )
    last = last.groupby("user_id", sort=False).head(RECENT_LIMIT)
    recent: dict[str, list[tuple[str, float]]] = {}
    for u, i, t in zip(last["user_id"], last["item_id"], last["ts"], strict=True):
        recent.setdefault(u, []).append((i, float(t)))
    # The profile service's definition (mercato.features), not a copy of it.
    affinity = category_affinities(h, vocab)
    buys = h[h["event"] == "purchase"]
    price = buys["item_id"].map(vocab.item_row).map(lambda r: float(vocab.item_price[r]))
    price = price[price > 0]
    mean_price = price.groupby(buys.loc[price.index, "user_id"]).mean().to_dict()
    out = []
    for k, u in enumerate(users):
        cart = [vocab.item_ids[r - 1] for r in cart_rows[k] if r > 0]
        out.append(
            RankerQuery(
                now=float(now),
                surface="home",
                recent=recent.get(u, []),
                cart=cart,
                category_affinity=affinity.get(u, {}),
                mean_unit_price=float(mean_price.get(u, 0.0)),
            )
        )
    return out


def build_lists(
    history: pd.DataFrame,
    future: pd.DataFrame,
    vocab: Vocab,
    data: RetailData,
    encode: Callable[[Any], np.ndarray],
    item_emb: np.ndarray,
    now: float,
    cfg: RankerConfig,
    require: str,
) -> RankLists:
    """Lists of the customers with history before ``now`` and activity after it.

    ``require`` "labels" keeps customers with any next-window event on a new item (fit),
    "truth" those with target events on new items (evaluation, as the retrieval
    evaluation counts users)."""
    enc_h = encode_events(history, vocab)
    codes, feats = walk_history(enc_h, vocab, now=now)
    code_ix = pd.Index(codes)
    n_items = vocab.n_items

    def pairs(u: np.ndarray, i: np.ndarray, v: np.ndarray) -> sp.csr_matrix:
        r = code_ix.get_indexer(u)
        keep = r >= 0
        m = sp.coo_matrix((v[keep], (r[keep], i[keep])), shape=(len(codes), n_items)).tocsr()
        return m

    exclude = pairs(enc_h["u"].to_numpy(), enc_h["i"].to_numpy(), np.ones(len(enc_h)))
    exclude.data[:] = 1.0
    fu = vocab.user_codes.get_indexer(future["user_id"]).astype(np.int64)
    fi = future["item_id"].map(vocab.item_row).to_numpy(np.int64)
    weights = {**DEFAULT_LABEL_WEIGHTS, **cfg.label_weights}
    fw = future["event"].map(weights).fillna(0.0).to_numpy(np.float64)
    # Strongest event per (user, item): sum of one-hot maxima via a groupby.
    g = (
        pd.DataFrame({"u": fu, "i": fi, "w": fw})
        .query("u >= 0 and w > 0")
        .groupby(["u", "i"], sort=False)["w"]
        .max()
        .reset_index()
    )
    labels = pairs(g["u"].to_numpy(), g["i"].to_numpy(), g["w"].to_numpy())
    labels = (labels - labels.multiply(exclude)).tocsr()
    labels.eliminate_zeros()
    tgt = future["event"].isin(data.target_events).to_numpy()
    truth = pairs(fu[tgt], fi[tgt], np.ones(int(tgt.sum())))
    truth.data[:] = 1.0
    truth = (truth - truth.multiply(exclude)).tocsr()
    truth.eliminate_zeros()
    base = truth if require == "truth" else labels
    keep = np.flatnonzero(np.diff(base.indptr) > 0)
    if cfg.max_users and len(keep) > cfg.max_users:
        rng = np.random.default_rng(cfg.seed)
        keep = np.sort(rng.choice(keep, size=cfg.max_users, replace=False))
    feats = feats.take(keep)
    users = [str(x) for x in vocab.user_codes[codes[keep]]]
    n = min(cfg.candidates, n_items)
    if len(keep):
        scores = encode(feats) @ item_emb.T
        rows = top_k(scores, exclude[keep], n)
        retr = np.take_along_axis(scores, rows, axis=1).astype(np.float64)
    else:
        rows = np.zeros((0, n), dtype=np.int64)
        retr = np.zeros((0, n))
    # Rows excluded (history) come out with -inf scores when history covers the catalog.
    mask = np.isfinite(retr)
    rows = np.where(mask, rows, -1)
    retr = np.where(mask, retr, 0.0)
    lab = labels[keep]
    lab_dense = np.zeros(rows.shape, dtype=np.float32)
    for u in range(len(keep)):
        a, b = lab.indptr[u], lab.indptr[u + 1]
        if a == b:
            continue
        got = dict(zip(lab.indices[a:b].tolist(), lab.data[a:b].tolist(), strict=True))
        lab_dense[u] = [got.get(r, 0.0) for r in rows[u].tolist()]
    queries = user_queries(history, users, vocab, now, feats.cart)
    table = item_table_at(history, vocab, now, cfg.popularity_days, cfg.trend_days)
    x = np.zeros((len(keep), n, N_FEATURES), dtype=np.float32)
    cat_names = [vocab.categories[c] for c in vocab.item_category]
    for u in range(len(keep)):
        m = mask[u]
        r = rows[u][m]
        cands = CandidateDetails(
            ids=[vocab.item_ids[i] for i in r.tolist()],
            scores=retr[u][m],
            price=vocab.item_price[r].astype(np.float64),
            stock=np.full(len(r), -1.0),
            margin=np.zeros(len(r)),
            category=[cat_names[i] for i in r.tolist()],
        )
        x[u, : len(r)] = build_features(queries[u], cands, table)
    return RankLists(users, rows, retr, x, lab_dense, truth[keep], mask)


# --------------------------------------------------------------------------- metrics


def rerank_metrics(
    rows: np.ndarray, scores: np.ndarray, truth: sp.csr_matrix, ks: tuple[int, ...]
) -> dict[str, float]:
    """Mean NDCG@K / Recall@K / HitRate@K when each list ``rows`` [U, N] (item rows, -1 =
    padding) is ordered by ``scores`` [U, N] (stable: ties keep the list order), with
    the retrieval evaluation's definitions (:func:`training.evaluate.metrics_from_ranking`);
    users without truth are skipped."""
    if len(rows) == 0:
        return {"users": 0.0}
    s = np.where(rows >= 0, scores, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")
    ranked = np.take_along_axis(rows, order, axis=1)
    width = max(ks)
    if ranked.shape[1] < width:
        ranked = np.pad(ranked, ((0, 0), (0, width - ranked.shape[1])), constant_values=-1)
    has = np.diff(truth.tocsr().indptr) > 0
    per_user = metrics_from_ranking(ranked[has], truth[has], ks)
    out = {name: float(v.mean()) if len(v) else 0.0 for name, v in per_user.items()}
    out["users"] = float(has.sum())
    return out


def graded_ndcg(labels: np.ndarray, scores: np.ndarray, mask: np.ndarray, k: int) -> float:
    """Mean NDCG@k with the graded labels as linear gains, within each list (lists
    without a positive label are skipped)."""
    s = np.where(mask, scores, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    gains = np.take_along_axis(np.where(mask, labels, 0.0), order, axis=1)
    disc = 1.0 / np.log2(np.arange(2, gains.shape[1] + 2))
    dcg = (gains * disc).sum(1)
    ideal = -np.sort(-np.where(mask, labels, 0.0), axis=1)[:, :k]
    idcg = (ideal * disc[: ideal.shape[1]]).sum(1)
    has = idcg > 0
    return float((dcg[has] / idcg[has]).mean()) if has.any() else 0.0


def format_comparison(results: dict[str, dict[str, dict[str, float]]], ks: tuple[int, ...]) -> str:
    """Markdown: per window, retrieval order vs ranker, and the relative change."""
    cols = [f"{m}@{k}" for k in ks for m in ("ndcg", "recall")]
    lines = [
        "| window | order | users | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 3) + "|",
    ]
    for window, res in results.items():
        r, m = res["retrieval"], res["ranker"]
        for name, row in (("retrieval (two-tower)", r), ("ranker", m)):
            lines.append(
                f"| {window} | {name} | {int(row.get('users', 0))} | "
                + " | ".join(f"{row.get(c, float('nan')):.4f}" for c in cols)
                + " |"
            )
        change = []
        for c in cols:
            a, b = r.get(c, 0.0), m.get(c, 0.0)
            change.append(f"{(b - a) / a * 100:+.1f} %" if a > 0 else "n/a")
        lines.append(f"| {window} | change | | " + " | ".join(change) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- training


@dataclass
class RankerHistory:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_metric: float = -math.inf
    seconds: float = 0.0


def _loss(net: RankerNet, x: Any, y: Any, m: Any, kind: str) -> Any:
    import torch
    import torch.nn.functional as F

    s = net(x)
    if kind == "listwise":
        s = s.masked_fill(~m, -1e9)
        y = y * m
        total = y.sum(1)
        has = total > 0
        if not bool(has.any()):
            return (s * 0.0).sum()
        p = y[has] / total[has].unsqueeze(1)
        return -(p * F.log_softmax(s[has], dim=1)).sum(1).mean()
    if kind == "pointwise":
        target = (y > 0).float()
        w = torch.where(y > 0, y, torch.ones_like(y)) * m
        bce = F.binary_cross_entropy_with_logits(s, target, reduction="none")
        return (bce * w).sum() / w.sum().clamp_min(1e-9)
    raise ValueError(f"loss must be 'listwise' or 'pointwise', not {kind!r}")


def _net_scores(net: RankerNet, x: np.ndarray) -> np.ndarray:
    import torch

    net.eval()
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy().astype(np.float64)


def train_ranker(
    fit: RankLists,
    valid: RankLists,
    cfg: RankerConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[RankerNet, RankerHistory]:
    """Fit the MLP on ``fit`` with early stopping on NDCG@K of ``valid``."""
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = RankerNet(N_FEATURES, cfg.hidden, start_from="score_z")
    flat = fit.x[fit.mask]
    if len(flat):
        mean = flat.mean(0)
        std = flat.std(0)
        std = np.where(std > 1e-6, std, 1.0)
        net.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        net.std.copy_(torch.from_numpy(std.astype(np.float32)))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    xt, yt, mt = (torch.from_numpy(a) for a in (fit.x, fit.labels, fit.mask))
    metric = f"ndcg@{cfg.early_stop_k}"
    ks = tuple(sorted({cfg.early_stop_k, *cfg.ks}))
    hist = RankerHistory()
    base = rerank_metrics(valid.rows, valid.retrieval, valid.truth, ks)

    # Epoch 0 is the untrained net, which ranks by the retrieval score: an epoch must beat
    # it to be kept, so the exported model is never worse than retrieval on validation.
    def stop_value(m: dict[str, float], scores: np.ndarray) -> float:
        if cfg.early_stop_on == "labels":
            return graded_ndcg(valid.labels, scores, valid.mask, cfg.early_stop_k)
        if cfg.early_stop_on == "truth":
            return m.get(metric, 0.0)
        raise ValueError(f"early_stop_on must be 'truth' or 'labels', not {cfg.early_stop_on!r}")

    s0 = _net_scores(net, valid.x)
    hist.best_metric = stop_value(rerank_metrics(valid.rows, s0, valid.truth, ks), s0)
    best: dict[str, Any] | None = copy.deepcopy(net.state_dict())
    bad = 0
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        te = time.perf_counter()
        net.train()
        perm = rng.permutation(len(fit))
        total, seen = 0.0, 0
        for a in range(0, len(perm), cfg.batch_lists):
            idx = torch.from_numpy(perm[a : a + cfg.batch_lists])
            loss = _loss(net, xt[idx], yt[idx], mt[idx], cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        sv = _net_scores(net, valid.x)
        m = rerank_metrics(valid.rows, sv, valid.truth, ks)
        stop = stop_value(m, sv)
        row = {
            "train_loss": total / max(seen, 1),
            f"epoch_valid_{metric.replace('@', '_')}": m.get(metric, 0.0),
            f"epoch_valid_recall_{cfg.early_stop_k}": m.get(f"recall@{cfg.early_stop_k}", 0.0),
            f"epoch_valid_retrieval_{metric.replace('@', '_')}": base.get(metric, 0.0),
            "epoch_valid_graded_ndcg": graded_ndcg(valid.labels, sv, valid.mask, cfg.early_stop_k),
            "epoch_seconds": time.perf_counter() - te,
        }
        hist.epochs.append({"epoch": float(epoch), **row})
        if cfg.progress:
            tqdm.write(
                f"ranker epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f} valid "
                f"{metric} {m.get(metric, 0.0):.4f} (retrieval order {base.get(metric, 0.0):.4f})"
                f" {row['epoch_seconds']:.1f}s"
            )
        if on_epoch is not None:
            on_epoch(epoch, row)
        if stop > hist.best_metric:
            hist.best_metric, hist.best_epoch = stop, epoch
            best = copy.deepcopy(net.state_dict())
            bad = 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best is not None:
        net.load_state_dict(best)
    net.eval()
    hist.seconds = time.perf_counter() - t0
    return net, hist


def curve_plot(hist: RankerHistory, metric_key: str, path: Path) -> None:
    """Train loss and validation NDCG per epoch, with the retrieval order as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in hist.epochs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(ep, [r["train_loss"] for r in hist.epochs], marker="o")
    a1.set_xlabel("epoch")
    a1.set_ylabel("train loss")
    a2.plot(ep, [r[f"epoch_valid_{metric_key}"] for r in hist.epochs], marker="o", label="ranker")
    a2.plot(
        ep,
        [r[f"epoch_valid_retrieval_{metric_key}"] for r in hist.epochs],
        linestyle="--",
        label="retrieval order",
    )
    a2.axvline(hist.best_epoch, color="grey", linewidth=0.8)
    a2.set_xlabel("epoch")
    a2.set_ylabel(f"valid {metric_key.replace('_', '@')}")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- pipeline


@dataclass
class RankerResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    model_name: str
    version: str | None
    alias: str | None
    bundle_dir: Path
    metrics: dict[str, dict[str, dict[str, float]]]  # window -> order -> metric -> value
    split_signature: str
    best_epoch: int
    table: str
    two_tower: dict[str, str]
    smoke: dict[str, Any]


def _two_tower(
    cfg: RankerConfig, data: RetailData, split: Split, vocab: Vocab
) -> tuple[Callable[[Any], np.ndarray], np.ndarray, dict[str, str]]:
    """User encoder and item embeddings of the two-tower the candidates come from."""
    from training.pipeline import query_times, train_rows
    from training.two_tower import encode_users, select_two_tower

    rc = cfg.retrieval
    if cfg.two_tower == "train":
        rows = train_rows(split, vocab, rc)
        if rows.n_rows == 0:
            raise ValueError("no training rows: the train split is empty")
        valid = build_eval_set(
            "valid",
            split.train,
            split.valid,
            vocab,
            data.target_events,
            rc.max_eval_users,
            rc.seed,
            now=query_times(split)[0],
        )
        net, items, _, _ = select_two_tower(vocab, rows, valid, rc.model)
        emb = items.all_embeddings(net)
        return (lambda f: encode_users(net, f)), emb, {"source": "trained in this run"}
    if cfg.two_tower == "registry":
        from services.models import TwoTowerBundle, download_bundle

        _, uri = _client(cfg)
        info, local = download_bundle(
            cfg.two_tower_model,
            cfg.two_tower_alias,
            uri,
            Path(tempfile.mkdtemp(prefix="mercato-tt-")),
        )
        bundle = TwoTowerBundle.load(local)
        sig = bundle.config.get("split_signature", "")
        if sig != split.signature():
            raise ValueError(
                f"{cfg.two_tower_model}@{cfg.two_tower_alias} v{info.version} was trained on "
                f"split {sig or '?'}, this run's split is {split.signature()}: the ranker's "
                "label windows would overlap its training data (use --two-tower train, or "
                "the same data and split options)"
            )
        if (
            bundle.item_ids != vocab.item_ids
            or bundle.vocab != vocab.as_json()
            or bundle.config.get("features") != vocab.feature_dict()
        ):
            raise ValueError("the registered two-tower's vocabularies differ from this data's")
        tt_net = bundle.net
        return (
            (lambda f: encode_users(tt_net, f)),
            bundle.item_embeddings,
            {
                "source": f"{cfg.two_tower_model}@{cfg.two_tower_alias}",
                "version": info.version,
                "run_id": info.run_id,
            },
        )
    raise ValueError(f"two_tower must be 'train' or 'registry', not {cfg.two_tower!r}")


def _client(cfg: RankerConfig) -> tuple[Any, str]:
    from training import registry

    return registry.client_for(cfg.tracking_uri or cfg.retrieval.tracking_uri or None)


def train_and_register_ranker(cfg: RankerConfig) -> RankerResult:
    """The whole ranker pipeline (module docstring); logs to MLflow and registers."""
    configure_threads(cfg.threads)
    import torch

    torch.manual_seed(cfg.seed)
    from mlflow.entities import Metric, Param

    from training import registry

    if cfg.early_stop_k > cfg.candidates or max(cfg.ks) > cfg.candidates:
        raise ValueError("candidates must be at least the largest K evaluated")
    rc = cfg.retrieval
    data = load_data(rc)
    split = make_split(data, rc)
    if split.kind != "time":
        print(f"note: {split.kind} split: windows are per-customer sessions, not time")
    vocab = build_vocab(data, rc.features)
    encode, item_emb, tt_info = _two_tower(cfg, data, split, vocab)

    def cutoff(frame: pd.DataFrame) -> float:
        return float(frame["ts"].max()) if len(frame) else 0.0

    t1 = float(split.params.get("t1", cutoff(split.train)))
    t2 = float(split.params.get("t2", cutoff(pd.concat([split.train, split.valid]))))
    hist_test = pd.concat([split.train, split.valid], ignore_index=True)
    lists = build_lists(
        split.train, split.valid, vocab, data, encode, item_emb, t1, cfg, require="labels"
    )
    test = build_lists(
        hist_test, split.test, vocab, data, encode, item_emb, t2, cfg, require="truth"
    )
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(len(lists))
    n_valid = round(len(lists) * cfg.valid_user_frac)
    valid = lists.take(np.sort(perm[:n_valid]))
    fit = lists.take(np.sort(perm[n_valid:]))
    if len(fit) == 0 or not (np.diff(valid.truth.indptr) > 0).any():
        raise ValueError("too little data: no fit lists or no validation customers with truth")

    client, tracking_uri = _client(cfg)
    exp_id = registry.ensure_experiment(
        client, cfg.experiment, tracking_uri, cfg.artifact_root or None
    )
    run = client.create_run(
        exp_id,
        run_name=cfg.run_name or None,
        tags={
            "model_family": "ranker",
            "dataset": data.name,
            "split": split.kind,
            "split_signature": split.signature(),
            "data_fingerprint": split.data_fingerprint,
            "two_tower": json.dumps(tt_info),
            "host.python": platform.python_version(),
        },
    )
    run_id = run.info.run_id
    status = "FAILED"
    version = None
    try:
        params = cfg.params()
        params.update(
            {
                "fit_lists": len(fit),
                "valid_lists": len(valid),
                "test_lists": len(test),
                "features": ",".join(FEATURES),
            }
        )
        plist = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for a in range(0, len(plist), 100):
            client.log_batch(run_id, params=plist[a : a + 100])

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            ts = int(time.time() * 1000)
            client.log_batch(
                run_id, metrics=[Metric(k, float(v), ts, epoch) for k, v in row.items()]
            )

        net, hist = train_ranker(fit, valid, cfg, on_epoch=on_epoch)
        ks = tuple(sorted({cfg.early_stop_k, *cfg.ks}))
        results: dict[str, dict[str, dict[str, float]]] = {}
        for name, ls in (("valid", valid), ("test", test)):
            results[name] = {
                "retrieval": rerank_metrics(ls.rows, ls.retrieval, ls.truth, ks),
                "ranker": rerank_metrics(ls.rows, _net_scores(net, ls.x), ls.truth, ks),
            }
        table = format_comparison(results, ks)
        final: list[Metric] = []
        ts = int(time.time() * 1000)
        for window, res in results.items():
            for order, m in res.items():
                prefix = window if order == "ranker" else f"{window}_{order}"
                final += [Metric(f"{prefix}_{k.replace('@', '_')}", v, ts, 0) for k, v in m.items()]
        for window, res in results.items():
            base_ndcg = res["retrieval"].get("ndcg@10", 0.0)
            if base_ndcg > 0:
                gain = res["ranker"].get("ndcg@10", 0.0) / base_ndcg - 1.0
                final.append(Metric(f"{window}_ndcg_10_relative_gain", gain, ts, 0))
        final += [
            Metric("best_epoch", float(hist.best_epoch), ts, 0),
            Metric("train_seconds", hist.seconds, ts, 0),
        ]
        client.log_batch(run_id, metrics=final)

        report = {
            "metrics": results,
            "history": hist.epochs,
            "best_epoch": hist.best_epoch,
            "lists": {"fit": len(fit), "valid": len(valid), "test": len(test)},
            "split": {"kind": split.kind, "signature": split.signature(), **split.params},
            "two_tower": tt_info,
        }
        now = cutoff(data.events)
        table_now = item_table_at(data.events, vocab, now, cfg.popularity_days, cfg.trend_days)
        smoke_x = test.x[test.mask][: cfg.smoke_rows]
        if len(smoke_x) == 0:
            smoke_x = fit.x[fit.mask][: cfg.smoke_rows]
        smoke = {
            "features": smoke_x.astype(np.float32).tolist(),
            "scores": _net_scores(net, smoke_x.astype(np.float32)).astype(np.float32).tolist(),
        }
        config = {
            "format_version": FORMAT_VERSION,
            "model_type": MODEL_TYPE,
            "features": list(FEATURES),
            "hidden": list(cfg.hidden),
            "loss": cfg.loss,
            "candidates": cfg.candidates,
            "label_weights": cfg.label_weights,
            "popularity_days": cfg.popularity_days,
            "trend_days": cfg.trend_days,
            "items_as_of": now,
            "dataset": data.name,
            "split_signature": split.signature(),
            "two_tower": tt_info,
            "run_id": run_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        bundle = RankerBundle(config, net, table_now, smoke=smoke, eval_report=report)
        out = Path(tempfile.mkdtemp(prefix="mercato-ranker-"))
        bundle_dir = out / BUNDLE_ARTIFACT_PATH
        bundle.save(bundle_dir)
        client.log_artifacts(run_id, str(bundle_dir), BUNDLE_ARTIFACT_PATH)
        eval_dir = out / "eval"
        eval_dir.mkdir()
        (eval_dir / "table.md").write_text(table + "\n")
        (eval_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        curve_plot(hist, f"ndcg_{cfg.early_stop_k}", eval_dir / "curve.png")
        client.log_artifacts(run_id, str(eval_dir), "eval")
        if cfg.register:
            gate = results["valid"]["ranker"].get(f"ndcg@{cfg.early_stop_k}", 0.0)
            mv = registry.register_bundle(
                client,
                run_id,
                cfg.model_name,
                cfg.alias or None,
                tags={
                    "split_signature": split.signature(),
                    "dataset": data.name,
                    GATE_METRIC: f"{gate:.6f}",
                },
                description="Mercato ranker: MLP over request features (bundle: network, "
                "normalisation, item table, smoke scores).",
            )
            version = str(mv.version)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)
    return RankerResult(
        run_id=run_id,
        experiment_id=exp_id,
        tracking_uri=tracking_uri,
        model_name=cfg.model_name,
        version=version,
        alias=cfg.alias if (cfg.register and cfg.alias) else None,
        bundle_dir=bundle_dir,
        metrics=results,
        split_signature=split.signature(),
        best_epoch=hist.best_epoch,
        table=table,
        two_tower=tt_info,
        smoke=smoke,
    )
