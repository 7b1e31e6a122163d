"""Training of the two-tower model (towers are defined in services.models.two_tower).

One row per customer (per customer and cut-off on time splits, see
:class:`training.features.TrainRows`): the input is the customer's distinct history,
the targets the items to predict; every row weighs the same, as in the metric, which
averages over customers. Input dropout removes history items at random.

Losses (``loss``):

- ``full`` (default): multinomial softmax over every item of the catalog (the item
  tower runs on all items each step); the batch shrinks so that batch x items stays
  under ``full_softmax_budget`` logits. Allowed up to ``full_softmax_max_items``.
- ``sampled``: softmax over the batch's target items plus ``negatives`` uniformly
  drawn items, each logit reduced by log q (q = the item's probability of being in the
  candidate set: its target frequency within a batch, plus the uniform draw), the
  sampling-bias correction of Yi et al. 2019, for catalogs too large for ``full``.

The score is ``u · v + b`` (dot product plus item bias). Initialisation (``init``):
``ease`` (default, catalogs up to ``warm_start_max_items``) writes a rank-``dim``
projection of EASE into the towers (:func:`ease_factors`, :func:`apply_warm_start`, λ
chosen on validation); that start is "epoch 0", a candidate of early stopping like any
epoch. ``random`` starts from small random weights. AdamW with decoupled weight
decay; early stopping on validation Recall@K with the best epoch's weights kept
(:func:`refit_two_tower` fits the chosen configuration again on more data). The best
epoch's lead over the warm start and the standard error of the paired per-customer
difference are recorded (``TrainHistory.fine_tune``); with ``fine_tune_min_se`` > 0 a
fine-tuned epoch replaces the warm start only when it leads by more than that many
standard errors (the one-standard-error rule; off by default: on the demo's shop it
changed the choice on 2 of 13 dev seeds, for no test gain, see docs/training.md).
``average`` "warm" (default): the candidate of epoch k is the element-wise mean of the
warm start's weights and epoch k's (weight averaging, still one two-tower exported to
FAISS like any other), chosen on validation as such and refit the same way; on the
demo's shop it raised the dev seeds' test Recall@10 where the fine-tuned epochs alone
were a coin flip against the start (docs/training.md, the demo's shop).
``grid`` lists (weight decay, input dropout) pairs tried one after the other, the best
on validation is kept (:func:`select_two_tower`); the test part is never read here.
Determinism: a seeded torch generator and numpy generator, one thread by default.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from services.models.two_tower import TwoTowerNet
from training import distributed
from training.baselines import ease_matrix
from training.evaluate import EmbeddingScorer, per_user
from training.features import EvalSet, TrainRows, UserFeatures, Vocab, ragged_positions


@dataclass
class TwoTowerConfig:
    dim: int = 64
    loss: str = "full"  # "full" | "sampled"
    lr: float = 5e-3
    weight_decay: float = 0.0
    input_dropout: float = 0.2
    holdout: float = 0.2  # random kind: share of items held out as targets (0 = predict all)
    horizon_days: float = 0.0  # time kind: targets within this after a cut-off (0 = all)
    batch_size: int = 256
    epochs: int = 60
    patience: int = 5
    early_stop_k: int = 20
    negatives: int = 4096  # sampled loss: uniform negatives per batch
    full_softmax_max_items: int = 300_000
    full_softmax_budget: int = 20_000_000  # batch rows x items per step
    grid: tuple[tuple[float, float], ...] = ()  # (weight_decay, input_dropout) to try
    init: str = "ease"  # "ease" (rank-dim EASE warm start when it fits) | "random"
    ease_lambdas: tuple[float, ...] = (250.0, 500.0)  # warm start: chosen on validation
    warm_start_max_items: int = 20_000  # dense items x items matrices above: random init
    warm_scale: float = 30.0  # the warm start's scores x this (softmax temperature)
    # A fine-tuned epoch replaces the warm start only when its validation gain over it is
    # above this many standard errors of the paired per-customer difference (the
    # one-standard-error rule; 0 = the best epoch, however small its lead).
    fine_tune_min_se: float = 0.0
    # "warm": the model after epoch k is the mean of the warm start's weights and epoch
    # k's (selected on validation as such, refit the same way); "none": epoch k's own.
    # Without a warm start (init "random" or a large catalog) there is nothing to average.
    average: str = "warm"
    # Popularity prior of the warm start's item bias: b_i = alpha * log1p(n_i), n_i the
    # item's training customers (ties broken by catalogue row), alpha chosen on validation
    # from these (with λ, see :func:`warm_start`); () = off (zero biases, as before: a
    # customer without history then scores every item 0).
    prior_alphas: tuple[float, ...] = (1e-4, 1e-3, 0.01, 0.03, 0.1, 0.3, 1.0)
    seed: int = 0
    progress: bool = True

    def to_params(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainHistory:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_metric: float = -math.inf
    seconds: float = 0.0
    tried: list[dict[str, float]] = field(default_factory=list)
    warm_start: dict[str, Any] = field(default_factory=dict)
    # The one-standard-error check of the best fine-tuned epoch against the warm start:
    # epoch, gain (validation metric), se (of the paired difference), kept.
    fine_tune: dict[str, float] = field(default_factory=dict)


@dataclass
class WarmStart:
    """Input (history) and output (item id) embeddings whose product ranks as a rank-d
    EASE: ``x P Qᵀ = x B Q Qᵀ`` (see :func:`ease_factors`)."""

    history: np.ndarray  # P [n_items, dim]
    items: np.ndarray  # Q [n_items, dim]
    lam: float
    valid_metric: float
    tried: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    valid_per_user: np.ndarray | None = None  # the validation metric of every customer
    # The item bias: alpha x popularity_prior (None = zero biases).
    bias: np.ndarray | None = None  # [n_items]
    alpha: float = 0.0
    valid_cold: float = math.nan  # the validation metric with every history masked
    # The validation metric of the same start without the prior (what fine-tuning starts
    # from): early stopping's patience counts from it (nan: valid_metric).
    base_metric: float = math.nan


def ease_factors(
    gram: np.ndarray, lam: float, dim: int, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``dim`` factors (P, Q) of EASE: the reduced-rank regression solution of
    ``min ||X - X W||²`` with ``rank(W) <= dim`` starting from EASE's ``B``:
    ``Q`` = the top-``dim`` eigenvectors of ``(XB)ᵀ(XB) = Bᵀ G B`` (the directions that
    keep most of EASE's fitted scores), ``P = B Q``, so ``x P Qᵀ`` is the projection of
    EASE's scores ``x B`` on them (exactly ``x B`` at ``dim = n_items``). Both factors
    are multiplied by ``sqrt(scale)``: ``scale`` sets the softmax temperature of the
    start, not its ranking. Items without interactions get zero rows."""
    import scipy.linalg

    b = ease_matrix(gram, lam)
    n = len(b)
    d = min(dim, n)
    b32 = b.astype(np.float32)
    fitted = b32.T @ (gram.astype(np.float32) @ b32)
    fitted = (fitted + fitted.T) / 2
    _, vecs = scipy.linalg.eigh(fitted, subset_by_index=[n - d, n - 1])
    vecs = vecs.astype(np.float64)
    q = vecs[:, ::-1]
    p = b @ q
    out_p = np.zeros((n, dim), dtype=np.float32)
    out_q = np.zeros((n, dim), dtype=np.float32)
    s = math.sqrt(scale)
    out_p[:, :d] = p * s
    out_q[:, :d] = q * s
    empty = np.diag(gram) == 0  # items without interactions: exactly zero factors
    out_p[empty] = 0.0
    out_q[empty] = 0.0
    return out_p, out_q


def popularity_prior(counts: np.ndarray) -> np.ndarray:
    """``log1p`` of each item's training popularity ``counts`` (customers with the item
    in their history), 0 for items without any, where equal counts are told apart by
    the catalogue row (the earlier row first: ``count + 0.5 (g - j) / g`` for the j-th of
    g items sharing a count), so the order is total and a customer without history gets
    a list without ties. Relative to an unseen item (bias 0): a new or untrained item
    ranks below every trained one for such a customer."""
    c = np.asarray(counts, dtype=np.float64)
    n = len(c)
    if n == 0:
        return np.zeros(0)
    order = np.lexsort((np.arange(n), -c))  # count descending, then row ascending
    cs = c[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(cs)) + 1])
    sizes = np.diff(np.concatenate([starts, [n]]))
    group = np.repeat(np.arange(len(starts)), sizes)
    j = np.arange(n) - starts[group]
    smoothed = np.empty(n)
    smoothed[order] = cs + 0.5 * (sizes[group] - j) / sizes[group]
    out = np.log1p(smoothed)
    out[c <= 0] = 0.0
    return out


def item_popularity(rows: TrainRows, n_items: int) -> np.ndarray:
    """Training customers per item (distinct: each customer's history once)."""
    x = history_matrix(rows, n_items)
    return np.asarray((x > 0).sum(axis=0)).ravel().astype(np.float64)


def cold_eval_set(es: EvalSet) -> EvalSet:
    """``es`` with every customer's history masked (no history items, no exclusions,
    context kept): how the model serves them as new visitors."""
    empty = sp.csr_matrix(es.history.shape, dtype=es.history.dtype)
    return EvalSet(es.name, es.users, empty, es.context, es.truth, empty.copy())


def _bags(hist: sp.csr_matrix) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR rows as (flat item indices + 1, offsets) for ``encode_user``."""
    h = hist.tocsr()
    return (
        torch.from_numpy(h.indices.astype(np.int64) + 1),
        torch.from_numpy(h.indptr[:-1].astype(np.int64)),
    )


def encode_eval_users(net: TwoTowerNet, es: EvalSet, batch: int = 4096) -> np.ndarray:
    """User vectors of an evaluation set's queries (whole history + context)."""
    net.eval()
    out = []
    with torch.no_grad():
        for a in range(0, len(es), batch):
            rows = slice(a, a + batch)
            flat, off = _bags(es.history[rows])
            ctx = torch.from_numpy(es.context[rows])
            out.append(net.encode_user(flat, off, *ctx.unbind(1)).numpy())
    if not out:
        return np.zeros((0, net.dim + 1), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


def encode_users(net: TwoTowerNet, f: UserFeatures, batch: int = 4096) -> np.ndarray:
    """User vectors of serving-style feature rows (recent, purchased, cart and anchor as
    the history, as ``TwoTowerBundle.encode_users`` reads a query)."""
    net.eval()
    out = []
    with torch.no_grad():
        for a in range(0, len(f), batch):
            g = f.take(np.arange(a, min(a + batch, len(f))))
            cols = np.concatenate([g.recent, g.purchased, g.cart, g.anchor[:, None]], axis=1)
            r = np.repeat(np.arange(len(g)), cols.shape[1])
            c = cols.ravel()
            keep = c > 0
            m = sp.csr_matrix(
                (np.ones(int(keep.sum()), np.float32), (r[keep], c[keep] - 1)),
                shape=(len(g), int(net.item_category.shape[0]) - 1),
            )
            m.sum_duplicates()
            flat, off = _bags(m)
            ctx = torch.from_numpy(np.stack([g.surface, g.country, g.segment, g.band], axis=1))
            out.append(net.encode_user(flat, off, *ctx.unbind(1)).numpy())
    if not out:
        return np.zeros((0, net.dim + 1), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


class ItemTable:
    """Feature tensors of every catalog item; ids of items without training events are
    set to "unknown" (0) so their vector comes from features, as for a new item."""

    def __init__(self, vocab: Vocab, trained_rows: np.ndarray) -> None:
        ids = np.arange(1, vocab.n_items + 1, dtype=np.int64)
        known = np.zeros(vocab.n_items, dtype=bool)
        known[trained_rows] = True
        self.known = known
        self.ids = torch.from_numpy(np.where(known, ids, 0))
        self.cat = torch.from_numpy(vocab.item_category)
        self.price = torch.from_numpy(vocab.item_price_bucket)
        self.attrs = torch.from_numpy(vocab.item_attrs)

    def encode(self, net: TwoTowerNet, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            return net.encode_item(self.ids, self.cat, self.price, self.attrs)
        return net.encode_item(self.ids[rows], self.cat[rows], self.price[rows], self.attrs[rows])

    def all_embeddings(self, net: TwoTowerNet, batch: int = 65_536) -> np.ndarray:
        net.eval()
        with torch.no_grad():
            out = [
                self.encode(net, torch.arange(a, min(a + batch, len(self.ids)))).numpy()
                for a in range(0, len(self.ids), batch)
            ]
        return np.concatenate(out).astype(np.float32)


def history_matrix(rows: TrainRows, n_items: int) -> sp.csr_matrix:
    """Binary customers x items matrix of the training rows' whole histories."""
    return sp.csr_matrix(
        (np.ones(len(rows.items), dtype=np.float32), rows.items, rows.indptr),
        shape=(len(rows.users), n_items),
    )


def apply_warm_start(net: TwoTowerNet, ws: WarmStart) -> None:
    """History embeddings = P; item vectors = Q, written as a category centroid (the
    category residual: the mean Q of the category's trained items) plus the id
    embedding ``Q - centroid``, so a new item starts at its category's centroid (cold
    start) while every trained item's vector is exactly its Q; the item (id) bias is
    ``ws.bias`` (the popularity prior) or zero. Every other weight (price and attribute
    residuals, context, category biases, base) is zero, so the net ranks exactly as
    ``x P Qᵀ + b`` (the user tower's ``1/sqrt(n)`` is per user: no ranking changes), and
    a customer without history (user vector ``[0, 1]``) by ``b`` alone."""
    q = ws.items.astype(np.float64)
    cat = net.item_category[1:].numpy()
    known = np.abs(q).sum(1) > 0
    n_cat = net.category.weight.shape[0]
    sums = np.zeros((n_cat, q.shape[1]))
    np.add.at(sums, cat[known], q[known])
    counts = np.bincount(cat[known], minlength=n_cat)
    centroid = sums / np.maximum(counts, 1)[:, None]
    centroid[0] = 0.0  # "no category" is padding
    ids = np.where(known[:, None], q - centroid[cat], 0.0)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.history.weight[1:] = torch.from_numpy(ws.history)
        net.item_id.weight[1:] = torch.from_numpy(ids.astype(np.float32))
        net.category.weight.copy_(torch.from_numpy(centroid.astype(np.float32)))
        if ws.bias is not None:
            net.item_bias.weight[1:, 0] = torch.from_numpy(ws.bias.astype(np.float32))


def warm_start(
    vocab: Vocab, rows: TrainRows, valid: EvalSet, cfg: TwoTowerConfig
) -> WarmStart | None:
    """The rank-``dim`` EASE start (:func:`ease_factors`) with its popularity prior
    (:func:`popularity_prior`), chosen on validation: λ from ``cfg.ease_lambdas`` on
    the start without the prior (validation Recall@K, ties to the earlier: what
    fine-tuning starts from, see :func:`train_two_tower`), then alpha from
    ``cfg.prior_alphas`` at that λ by the highest mean of the validation Recall@K of the
    customers as they are and with their history masked (:func:`cold_eval_set`), ties to
    the smaller. At the start every alpha > 0 gives a masked customer the same list
    (popularity order: the user vector is ``[0, 1]``), so this is the best ordinary
    validation recall among the alphas, and the smallest alpha, a tie-break, is in the
    grid. ``tried`` lists every λ (alpha 0) then every alpha. None when ``cfg.init`` is
    "random" or the catalog is larger than ``cfg.warm_start_max_items``."""
    if cfg.init not in ("ease", "random"):
        raise ValueError(f"init must be 'ease' or 'random', not {cfg.init!r}")
    if cfg.init == "random" or vocab.n_items > cfg.warm_start_max_items:
        return None
    if any(a <= 0 for a in cfg.prior_alphas):
        raise ValueError(f"prior_alphas must be > 0 (none = off), not {cfg.prior_alphas}")
    t0 = time.perf_counter()
    x = history_matrix(rows, vocab.n_items)
    gram = (x.T @ x).toarray().astype(np.float64)
    prior = popularity_prior(item_popularity(rows, vocab.n_items))
    alphas: tuple[float | None, ...] = tuple(sorted(cfg.prior_alphas)) or (None,)
    metric = f"recall@{cfg.early_stop_k}"
    cold = cold_eval_set(valid)
    best: WarmStart | None = None
    tried: list[dict[str, float]] = []
    net = new_net(vocab, cfg)
    items = ItemTable(vocab, np.unique(rows.items))

    def score(ws: WarmStart) -> WarmStart:
        apply_warm_start(net, ws)
        ws.valid_per_user = valid_per_user(net, items, valid, cfg.early_stop_k)
        ws.valid_metric = float(ws.valid_per_user.mean()) if len(valid) else 0.0
        cold_user = valid_per_user(net, items, cold, cfg.early_stop_k)
        ws.valid_cold = float(cold_user.mean()) if len(cold) else 0.0
        tried.append(
            {
                "lambda": ws.lam,
                "prior_alpha": ws.alpha,
                f"valid_{metric}": ws.valid_metric,
                f"valid_cold_{metric}": ws.valid_cold,
            }
        )
        if cfg.progress:
            tqdm.write(
                f"warm start: EASE λ={ws.lam} rank {cfg.dim} prior alpha={ws.alpha:g}: valid "
                f"{metric} {ws.valid_metric:.4f}, history masked {ws.valid_cold:.4f}"
            )
        return ws

    # λ first, on the start without the prior (as before the prior: fine-tuning starts
    # from that start, so its λ is the one a prior-less run would take), ...
    for lam in cfg.ease_lambdas:
        p, q = ease_factors(gram, lam, cfg.dim, cfg.warm_scale)
        ws = score(WarmStart(p, q, lam, 0.0))
        if best is None or ws.valid_metric > best.valid_metric:
            best = ws
    # ... then alpha at that λ, by the mean of the ordinary and the masked recall.
    assert best is not None
    base = best
    if alphas != (None,):
        best, best_score = None, -math.inf
        for alpha in alphas:
            assert alpha is not None
            ws = score(replace(base, bias=alpha * prior, alpha=alpha, tried=[]))
            if best is None or (ws.valid_metric + ws.valid_cold) / 2 > best_score:
                best, best_score = ws, (ws.valid_metric + ws.valid_cold) / 2
    assert best is not None
    best.base_metric = base.valid_metric
    best.tried = tried
    best.seconds = time.perf_counter() - t0
    return best


def valid_per_user(net: TwoTowerNet, items: ItemTable, valid: EvalSet, k: int) -> np.ndarray:
    """Recall@k of every validation customer (the early-stopping metric, unaveraged)."""
    if len(valid) == 0:
        return np.zeros(0)
    scorer = EmbeddingScorer(encode_eval_users(net, valid), items.all_embeddings(net))
    return per_user(scorer, valid, ks=(k,))[f"recall@{k}"]


def one_se_gain(best: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the paired per-customer difference ``best - base``."""
    d = np.asarray(best, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    if len(d) < 2:
        return float(d.mean()) if len(d) else 0.0, math.inf
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def new_net(vocab: Vocab, cfg: TwoTowerConfig) -> TwoTowerNet:
    net = TwoTowerNet(
        n_items=vocab.n_items,
        n_categories=len(vocab.categories),
        n_surfaces=len(vocab.surfaces),
        n_countries=len(vocab.countries),
        n_segments=len(vocab.segments),
        n_price_buckets=len(vocab.price_boundaries) + 1,
        attr_buckets=vocab.features.attr_buckets,
        dim=cfg.dim,
    )
    cat = np.concatenate([[0], vocab.item_category])
    net.item_category.copy_(torch.from_numpy(cat))
    return net


@dataclass
class Batch:
    flat: torch.Tensor  # input item indices (+1)
    offsets: torch.Tensor
    context: torch.Tensor  # [B, 4]
    t_row: torch.Tensor  # target row in batch
    t_item: torch.Tensor  # target item row
    t_weight: torch.Tensor


def make_batch(
    rows: TrainRows, sel: np.ndarray, cfg: TwoTowerConfig, rng: np.random.Generator
) -> Batch:
    """Inputs and targets of the rows ``sel`` (input dropout and, for random rows, the
    hold-out drawn from ``rng``)."""
    k = rows.row_user[sel]
    base = rows.indptr[k]
    if rows.kind == "time":
        n_in, n_t = rows.start[sel], rows.end[sel] - rows.start[sel]
        pos_in = ragged_positions(base, n_in)
        pos_t = ragged_positions(base + n_in, n_t)
        row_in = np.repeat(np.arange(len(sel)), n_in)
        row_t = np.repeat(np.arange(len(sel)), n_t)
    else:
        n = rows.end[sel]
        pos = ragged_positions(base, n)
        row = np.repeat(np.arange(len(sel)), n)
        if cfg.holdout > 0:
            held = rng.random(len(pos)) < cfg.holdout
            pos_in, row_in, pos_t, row_t = pos[~held], row[~held], pos[held], row[held]
        else:  # denoising: predict every item from the input with dropout
            pos_in, row_in, pos_t, row_t = pos, row, pos, row
    if cfg.input_dropout > 0 and len(pos_in):
        keep = rng.random(len(pos_in)) >= cfg.input_dropout
        pos_in, row_in = pos_in[keep], row_in[keep]
    counts = np.bincount(row_in, minlength=len(sel))
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    t = torch.from_numpy
    return Batch(
        flat=t(rows.items[pos_in] + 1),
        offsets=t(offsets),
        context=t(rows.context[sel]),
        t_row=t(row_t.astype(np.int64)),
        t_item=t(rows.items[pos_t]),
        t_weight=t(rows.weight[pos_t].astype(np.float32)),
    )


def _row_loss(logp_t: torch.Tensor, b: Batch, n_rows: int) -> torch.Tensor:
    """Mean over rows with targets of the weighted mean target log-likelihood."""
    w_sum = torch.zeros(n_rows).index_add_(0, b.t_row, b.t_weight)
    per_row = torch.zeros(n_rows).index_add_(0, b.t_row, -logp_t * b.t_weight)
    has = w_sum > 0
    return (per_row[has] / w_sum[has]).mean()


def batch_loss(
    net: TwoTowerNet,
    items: ItemTable,
    b: Batch,
    cfg: TwoTowerConfig,
    log_q: torch.Tensor | None,
    gen: torch.Generator,
) -> torch.Tensor:
    u = net.encode_user(b.flat, b.offsets, *b.context.unbind(1))
    n_rows = len(b.offsets)
    if len(b.t_item) == 0:  # nothing to predict: a zero loss (ranks stay in step)
        return (u * 0.0).sum() + 0.0 * sum(p.sum() for p in net.parameters())
    if cfg.loss == "full":
        v = items.encode(net)
        logp = torch.log_softmax(u @ v.T, dim=1)
        return _row_loss(logp[b.t_row, b.t_item], b, n_rows)
    assert log_q is not None
    n_items = len(items.ids)
    neg = torch.randint(0, n_items, (cfg.negatives,), generator=gen)
    cand, inv = torch.unique(torch.cat([b.t_item, neg]), return_inverse=True)
    v = items.encode(net, cand)
    # P(item in the candidate set) ~ P(a target of the batch) + P(uniformly drawn).
    q = (
        1.0
        - torch.exp(len(b.t_item) * torch.log1p(-torch.exp(log_q[cand]).clamp_max(1 - 1e-7)))
        + cfg.negatives / n_items
    ).clamp_max(1.0)
    logits = u @ v.T - torch.log(q).unsqueeze(0)
    logp = torch.log_softmax(logits, dim=1)
    return _row_loss(logp[b.t_row, inv[: len(b.t_item)]], b, n_rows)


def mean_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The element-wise mean of two state dicts of one net (integer buffers from ``a``):
    still one two-tower, exported like any other."""
    return {k: (v + b[k]) / 2 if v.is_floating_point() else v.clone() for k, v in a.items()}


def _start_state(start: TwoTowerNet, warm: WarmStart) -> dict[str, torch.Tensor]:
    """The weights of ``start`` (the prior-less warm start, untrained) with the popularity
    prior as item bias: the epoch-0 candidate (no new net: the torch RNG is not drawn)."""
    state = copy.deepcopy(start.state_dict())
    if warm.bias is not None:
        state["item_bias.weight"][1:, 0] = torch.from_numpy(warm.bias.astype(np.float32))
    return state


def _epoch_rows(rows: TrainRows, rng: np.random.Generator) -> np.ndarray:
    """One row per customer (a random cut-off of each on time rows), shuffled."""
    n_cut = np.diff(rows.user_rows)
    has = np.flatnonzero(n_cut > 0)
    pick = rows.user_rows[has] + np.floor(rng.random(len(has)) * n_cut[has]).astype(np.int64)
    return rng.permutation(pick)


def train_two_tower(
    vocab: Vocab,
    rows: TrainRows,
    valid: EvalSet | None,
    cfg: TwoTowerConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    warm: WarmStart | None = None,
) -> tuple[TwoTowerNet, ItemTable, TrainHistory]:
    """Train with early stopping on ``valid``; returns the best net and its item table.
    ``warm`` (:func:`warm_start`) is the initial weights and the epoch-0 candidate.
    Without ``valid`` (a refit) exactly ``cfg.epochs`` epochs run and the last is kept.

    Under torch.distributed (see :mod:`training.distributed`) every rank trains on its
    slice of each global batch and gradients are averaged, so all ranks end with the same
    weights; rank 0 evaluates and decides early stopping.
    """
    rank, world = distributed.rank_world()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 7919 * rank)
    rng = np.random.default_rng(cfg.seed)
    rng_rank = np.random.default_rng(cfg.seed + 7919 * rank)
    if cfg.loss not in ("full", "sampled"):
        raise ValueError(f"loss must be 'full' or 'sampled', not {cfg.loss!r}")
    if cfg.average not in ("none", "warm"):
        raise ValueError(f"average must be 'none' or 'warm', not {cfg.average!r}")
    n_items = vocab.n_items
    if cfg.loss == "full" and n_items > cfg.full_softmax_max_items:
        raise ValueError(
            f"full softmax over {n_items} items exceeds full_softmax_max_items="
            f"{cfg.full_softmax_max_items}; use loss='sampled'"
        )
    if rows.n_rows == 0:
        raise ValueError("no training rows: the train split has no customer with history")
    net = new_net(vocab, cfg)
    if warm is not None:
        # Fine-tuning (and the averaging with the start) starts from the start without its
        # popularity prior: the fine-tuned candidates are those of the prior-less start (the
        # prior changed their course and cost validation recall on the end-to-end shop);
        # the prior is in the epoch-0 candidate, the start itself, below.
        apply_warm_start(net, replace(warm, bias=None))
    distributed.broadcast_parameters(net)
    # With cfg.average == "warm" every candidate epoch is the mean of these weights and
    # the epoch's (a model between the start and the fine-tuned one), in the refit too.
    start: dict[str, torch.Tensor] | None = None
    shadow = net
    if warm is not None and cfg.average == "warm":
        start = copy.deepcopy(net.state_dict())
        shadow = new_net(vocab, cfg)
    items = ItemTable(vocab, np.unique(rows.items))
    counts = rows.target_counts(n_items)
    log_q = torch.from_numpy(np.log(np.maximum(counts, 1.0) / counts.sum()).astype(np.float32))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = cfg.batch_size
    if cfg.loss == "full":
        batch = max(16, min(batch, cfg.full_softmax_budget // max(n_items, 1)))
    hist = TrainHistory()
    best_state: dict[str, torch.Tensor] | None = None
    bad = 0
    t0 = time.perf_counter()
    metric = f"recall@{cfg.early_stop_k}"
    warm_state: dict[str, torch.Tensor] | None = None
    best_user: np.ndarray | None = None  # rank 0: the best epoch's per-customer metric
    # Patience counts from the prior-less start (what fine-tuning starts from), so the
    # same epochs run as without the prior; the start with its prior is only a candidate.
    stop_best = -math.inf
    if warm is not None and valid is not None:  # "epoch 0", the warm start, is a candidate
        hist.best_metric, hist.best_epoch = warm.valid_metric, 0
        stop_best = warm.valid_metric if math.isnan(warm.base_metric) else warm.base_metric
        warm_state = _start_state(net, warm)
        best_state = warm_state
    for epoch in range(cfg.epochs):
        net.train()
        order = _epoch_rows(rows, rng)
        steps = math.ceil(len(order) / batch)
        total, seen = 0.0, 0
        te = time.perf_counter()
        bar = tqdm(
            range(steps),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress or rank != 0,
            leave=False,
            unit="batch",
        )
        for s in bar:
            sel = order[s * batch : (s + 1) * batch][rank::world]
            if len(sel) == 0:  # a last global batch smaller than the world
                sel = order[s * batch : s * batch + 1]
            b = make_batch(rows, sel, cfg, rng_rank)
            loss = batch_loss(net, items, b, cfg, log_q, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(net)
            opt.step()
            total += float(loss.detach()) * len(sel)
            seen += len(sel)
        train_s = time.perf_counter() - te
        value = 0.0
        if valid is None:  # a refit: a fixed number of epochs, the last one kept
            hist.epochs.append({"epoch": float(epoch + 1), "train_loss": total / max(seen, 1)})
            continue
        state = net.state_dict() if start is None else mean_state(start, net.state_dict())
        if start is not None:
            shadow.load_state_dict(state)
        user_metric = None
        if rank == 0:
            user_metric = valid_per_user(shadow, items, valid, cfg.early_stop_k)
            value = float(user_metric.mean()) if len(user_metric) else 0.0
        value = distributed.broadcast_float(value)
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
                f"{value:.4f} ({train_s:.1f}s)"
            )
        if on_epoch is not None and rank == 0:
            on_epoch(epoch + 1, row)
        if value > hist.best_metric:
            hist.best_metric, hist.best_epoch = value, epoch + 1
            best_state = copy.deepcopy(state)
            best_user = user_metric
        if value > stop_best:
            stop_best = value
            bad = 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if warm is not None and warm_state is not None and hist.best_epoch > 0:
        # The best epoch's lead over the warm start must exceed cfg.fine_tune_min_se
        # standard errors of the paired difference, else the warm start is kept: on small
        # validation sets the best of many noisy epochs leads by chance (and the refit,
        # which repeats the epoch count on other data, would not repeat that luck).
        gain, se = 0.0, math.inf
        if rank == 0 and best_user is not None and warm.valid_per_user is not None:
            gain, se = one_se_gain(best_user, warm.valid_per_user)
        lead = cfg.fine_tune_min_se <= 0 or gain > cfg.fine_tune_min_se * se
        kept = distributed.broadcast_float(float(lead)) > 0.5
        hist.fine_tune = {
            "epoch": float(hist.best_epoch),
            "gain": gain,
            "se": se,
            "kept": float(kept),
        }
        if cfg.progress and rank == 0:
            tqdm.write(
                f"epoch {hist.best_epoch} leads the warm start by {gain:+.4f} "
                f"(se {se:.4f}): {'kept' if kept else 'warm start kept'}"
            )
        if not kept:
            best_state = warm_state
            hist.best_metric, hist.best_epoch = warm.valid_metric, 0
    if best_state is not None:
        net.load_state_dict(best_state)
    elif start is not None and hist.epochs:  # a refit: the last epoch averaged likewise
        net.load_state_dict(mean_state(start, net.state_dict()))
    elif warm is not None and not hist.epochs:  # a refit of the start alone: with its prior
        net.load_state_dict(_start_state(net, warm))
    # Items never seen in training keep untrained (random) id vectors, biases and history
    # vectors: zero them, so that any caller (serving included) embeds them from features
    # like a new item, and a history holding them is read as if they were not there.
    with torch.no_grad():
        unseen = torch.from_numpy(np.flatnonzero(~items.known) + 1)
        net.item_id.weight[unseen] = 0.0
        net.item_bias.weight[unseen] = 0.0
        net.history.weight[unseen] = 0.0
    net.eval()
    hist.seconds = time.perf_counter() - t0
    return net, items, hist


def refit_two_tower(
    vocab: Vocab, rows: TrainRows, chosen: TwoTowerConfig, hist: TrainHistory
) -> tuple[TwoTowerNet, ItemTable, TrainHistory]:
    """The configuration chosen on validation (weight decay, input dropout, the warm
    start's λ, the best epoch count) fit again on ``rows`` (train + validation), without
    looking at any evaluation data: the warm start recomputed from ``rows`` with the
    chosen λ (and its popularity prior from ``rows`` with the chosen alpha), then
    exactly ``hist.best_epoch`` epochs."""
    cfg = replace(chosen, epochs=max(hist.best_epoch, 0), grid=())
    warm = None
    if hist.warm_start:
        lam = float(hist.warm_start["lambda"])
        x = history_matrix(rows, vocab.n_items)
        p, q = ease_factors((x.T @ x).toarray().astype(np.float64), lam, cfg.dim, cfg.warm_scale)
        alpha = float(hist.warm_start.get("prior_alpha", 0.0))
        bias = alpha * popularity_prior(item_popularity(rows, vocab.n_items)) if alpha else None
        warm = WarmStart(p, q, lam, math.nan, bias=bias, alpha=alpha)
    elif cfg.epochs == 0:
        raise ValueError("nothing to refit: no warm start and no epoch")
    net, items, h = train_two_tower(vocab, rows, None, cfg, warm=warm)
    return net, items, h


def select_two_tower(
    vocab: Vocab,
    rows: TrainRows,
    valid: EvalSet,
    cfg: TwoTowerConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[TwoTowerNet, ItemTable, TrainHistory, TwoTowerConfig]:
    """Train every (weight decay, input dropout) of ``cfg.grid`` (or ``cfg`` alone) and
    keep the best on validation; the history lists every try. ``on_epoch`` gets the
    epochs of all tries, numbered on."""
    grid = cfg.grid or ((cfg.weight_decay, cfg.input_dropout),)
    t0 = time.perf_counter()
    warm = warm_start(vocab, rows, valid, cfg)
    best: tuple[TwoTowerNet, ItemTable, TrainHistory, TwoTowerConfig] | None = None
    tried: list[dict[str, float]] = []
    offset = 0
    for wd, drop in grid:
        c = replace(cfg, weight_decay=wd, input_dropout=drop, grid=())

        def shifted(epoch: int, row: dict[str, float], at: int = offset) -> None:
            if on_epoch is not None:
                on_epoch(at + epoch, row)

        net, items, h = train_two_tower(vocab, rows, valid, c, shifted, warm)
        offset += len(h.epochs)
        tried.append(
            {
                "weight_decay": wd,
                "input_dropout": drop,
                "best_epoch": float(h.best_epoch),
                f"valid_recall@{cfg.early_stop_k}": h.best_metric,
                "seconds": h.seconds,
                **{f"fine_tune_{k}": v for k, v in h.fine_tune.items()},
            }
        )
        if cfg.progress:
            tqdm.write(
                f"two-tower wd={wd} dropout={drop}: valid recall@{cfg.early_stop_k} "
                f"{h.best_metric:.4f} at epoch {h.best_epoch} ({h.seconds:.1f}s)"
            )
        if best is None or h.best_metric > best[2].best_metric:
            best = (net, items, h, c)
    assert best is not None
    best[2].tried = tried
    best[2].seconds = time.perf_counter() - t0
    if warm is not None:
        best[2].warm_start = {
            "lambda": warm.lam,
            "prior_alpha": warm.alpha,
            f"valid_cold_recall@{cfg.early_stop_k}": warm.valid_cold,
            "rank": cfg.dim,
            "scale": cfg.warm_scale,
            f"valid_recall@{cfg.early_stop_k}": warm.valid_metric,
            "tried": warm.tried,
            "seconds": warm.seconds,
        }
    return best
