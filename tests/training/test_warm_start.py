"""The two-tower's closed-form warm start: a rank-d EASE written into the towers."""

from __future__ import annotations

import os
from dataclasses import replace

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from training.baselines import ease_matrix
from training.data import time_split
from training.features import build_eval_set, build_vocab
from training.pipeline import TrainConfig, query_times, train_rows
from training.synthetic import SyntheticConfig, generate
from training.two_tower import (
    ItemTable,
    TwoTowerConfig,
    WarmStart,
    apply_warm_start,
    cold_eval_set,
    ease_factors,
    encode_eval_users,
    history_matrix,
    item_popularity,
    new_net,
    one_se_gain,
    popularity_prior,
    refit_two_tower,
    select_two_tower,
    train_two_tower,
    valid_per_user,
    warm_start,
)

TINY = SyntheticConfig(n_users=400, n_items=200, n_categories=12, days=60, seed=5)


def _random_binary(users: int, items: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.random((users, items)) < 0.3).astype(np.float64)
    x[:, 0] = 1.0  # a popular item, so no column is empty
    return x


def test_full_rank_factors_reproduce_ease_scores() -> None:
    x = _random_binary(40, 12)
    gram = x.T @ x
    b = ease_matrix(gram, 3.0)
    # EASE's defining properties: zero diagonal, B = I - P / diag(P).
    assert np.allclose(np.diag(b), 0.0)
    p_inv = np.linalg.inv(gram + 3.0 * np.eye(12))
    off = ~np.eye(12, dtype=bool)
    np.testing.assert_allclose(b[off], (-p_inv / np.diag(p_inv)[None, :])[off], rtol=1e-9)
    p, q = ease_factors(gram, 3.0, dim=12, scale=1.0)
    np.testing.assert_allclose(x @ p @ q.T, x @ b, atol=1e-4)
    # A larger dim than the catalog pads with zero columns.
    p16, q16 = ease_factors(gram, 3.0, dim=16, scale=1.0)
    assert p16.shape == (12, 16) and np.allclose(p16[:, 12:], 0.0)
    np.testing.assert_allclose(x @ p16 @ q16.T, x @ b, atol=1e-4)


def test_low_rank_factors_are_the_best_projection_of_ease_scores() -> None:
    x = _random_binary(60, 15, seed=1)
    gram = x.T @ x
    b = ease_matrix(gram, 2.0)
    p, q = ease_factors(gram, 2.0, dim=4, scale=1.0)
    y = x @ b
    approx = x @ p @ q.T
    assert np.linalg.matrix_rank(p @ q.T, tol=1e-6) == 4
    # Reduced-rank regression: the projection on the top eigenvectors of YᵀY keeps more
    # of EASE's fitted scores than any other rank-4 projection, e.g. a truncated SVD of B.
    u, s, vt = np.linalg.svd(b)
    svd = x @ (u[:, :4] * s[:4]) @ vt[:4]
    err = np.linalg.norm(y - approx)
    assert err < np.linalg.norm(y - svd)
    _, vecs = np.linalg.eigh(y.T @ y)
    top = vecs[:, -4:]
    np.testing.assert_allclose(approx, y @ top @ top.T, atol=1e-4)
    # The scale multiplies the scores, it changes no ranking.
    p3, q3 = ease_factors(gram, 2.0, dim=4, scale=9.0)
    np.testing.assert_allclose(x @ p3 @ q3.T, 9.0 * approx, atol=1e-3)


def _tiny() -> tuple:
    data = generate(TINY)
    split = time_split(data)
    vocab = build_vocab(data)
    cfg = replace(TwoTowerConfig(), dim=8, progress=False, ease_lambdas=(20.0,))
    rows = train_rows(split, vocab, TrainConfig(model=cfg))
    valid = build_eval_set(
        "valid", split.train, split.valid, vocab, data.target_events, now=query_times(split)[0]
    )
    return vocab, rows, valid, cfg


def test_warm_started_towers_rank_as_the_factors_and_new_items_start_at_a_centroid() -> None:
    vocab, rows, valid, cfg = _tiny()
    x = history_matrix(rows, vocab.n_items)
    gram = (x.T @ x).toarray()
    p, q = ease_factors(gram, 20.0, cfg.dim, cfg.warm_scale)
    net = new_net(vocab, cfg)
    apply_warm_start(net, WarmStart(p, q, 20.0, 0.0))
    items = ItemTable(vocab, np.unique(rows.items))
    scores = encode_eval_users(net, valid) @ items.all_embeddings(net).T
    h = valid.history.tocsr()
    n = np.diff(h.indptr).astype(np.float64)
    expected = np.asarray(sp.csr_matrix(h) @ p) @ q.T
    known = np.abs(q).sum(1) > 0
    assert known.sum() > 0.8 * vocab.n_items
    np.testing.assert_allclose(
        (scores * np.sqrt(n)[:, None])[:, known], expected[:, known], rtol=1e-3, atol=1e-3
    )
    # A new item (id 0) of category c starts at the mean Q of c's trained items.
    c = int(np.bincount(vocab.item_category[known]).argmax())
    members = known & (vocab.item_category == c)
    t = torch.from_numpy
    with torch.no_grad():
        v = net.encode_item(
            t(np.array([0])), t(np.array([c])), t(np.array([1])), t(np.zeros((1, 8), np.int64))
        ).numpy()[0]
    np.testing.assert_allclose(v[:-1], q[members].mean(0), atol=1e-5)
    assert np.abs(v[:-1]).sum() > 0 and v[-1] == 0.0


def test_popularity_prior_is_log_count_with_ties_broken_by_row() -> None:
    counts = np.array([3, 0, 5, 3, 1, 3, 1, 0])
    prior = popularity_prior(counts)
    assert prior[1] == 0.0 and prior[7] == 0.0  # no customer: an unseen item's bias
    pos = counts > 0
    # log1p of the count, moved up by at most half a customer to break ties.
    assert np.all(prior[pos] > np.log1p(counts[pos]))
    assert np.all(prior[pos] <= np.log1p(counts[pos] + 0.5))
    # Count first, then the earlier row: one total order, still distinct in float32.
    order = np.argsort(-prior, kind="stable")[: int(pos.sum())]
    assert order.tolist() == [2, 0, 3, 5, 4, 6]
    assert len(np.unique(prior[pos].astype(np.float32))) == pos.sum()
    assert popularity_prior(np.zeros(0)).shape == (0,)


def test_warm_start_chooses_its_popularity_prior_on_validation() -> None:
    vocab, rows, valid, cfg = _tiny()
    ws = warm_start(vocab, rows, valid, cfg)
    off = warm_start(vocab, rows, valid, replace(cfg, prior_alphas=()))
    assert ws is not None and off is not None and off.bias is None
    tried = ws.tried[1:]  # after the one λ's prior-less start
    assert ws.tried[0]["prior_alpha"] == 0.0
    assert [t["prior_alpha"] for t in tried] == sorted(cfg.prior_alphas)
    # A customer with history masked gets the popularity order whatever alpha > 0 (the
    # start's user vector is [0, 1]), better than the prior-less start's ties.
    cold = {t["valid_cold_recall@20"] for t in tried}
    assert len(cold) == 1 and ws.valid_cold == cold.pop() > off.valid_cold
    # So the rule (mean of both numbers) keeps the best ordinary validation recall; the
    # smallest alpha only breaks ties: it ranks customers with history as without prior.
    best = max(tried, key=lambda t: t["valid_recall@20"])
    assert ws.alpha == best["prior_alpha"] and ws.valid_metric == best["valid_recall@20"]
    assert tried[0]["valid_recall@20"] == off.valid_metric <= ws.valid_metric
    # The item bias of the start is alpha x the prior of the training popularity.
    net = new_net(vocab, cfg)
    apply_warm_start(net, ws)
    prior = popularity_prior(item_popularity(rows, vocab.n_items))
    np.testing.assert_allclose(net.item_bias.weight[1:, 0].detach().numpy(), ws.alpha * prior)
    items = ItemTable(vocab, np.unique(rows.items))
    masked = cold_eval_set(valid)
    assert masked.history.nnz == 0 and masked.exclude.nnz == 0
    scores = encode_eval_users(net, masked.take(np.arange(3))) @ items.all_embeddings(net).T
    np.testing.assert_allclose(scores, np.tile(ws.alpha * prior, (3, 1)), atol=1e-6)
    with pytest.raises(ValueError, match="prior_alphas"):
        warm_start(vocab, rows, valid, replace(cfg, prior_alphas=(0.0, 0.1)))


def test_warm_start_only_where_it_fits() -> None:
    vocab, rows, valid, cfg = _tiny()
    assert warm_start(vocab, rows, valid, replace(cfg, init="random")) is None
    assert warm_start(vocab, rows, valid, replace(cfg, warm_start_max_items=100)) is None
    with pytest.raises(ValueError, match="init"):
        warm_start(vocab, rows, valid, replace(cfg, init="svd"))


@pytest.mark.slow
def test_the_warm_start_is_epoch_zero_and_kept_when_training_does_worse() -> None:
    vocab, rows, valid, cfg = _tiny()
    ws = warm_start(vocab, rows, valid, replace(cfg, ease_lambdas=(5.0, 20.0)))
    n_alpha = len(cfg.prior_alphas)
    # λ on the prior-less start, then every alpha at the chosen λ.
    assert ws is not None and [t["lambda"] for t in ws.tried[:2]] == [5.0, 20.0]
    assert [t["prior_alpha"] for t in ws.tried[:2]] == [0.0, 0.0]
    lam = max(ws.tried[:2], key=lambda t: t["valid_recall@20"])["lambda"]
    assert ws.lam == lam and [t["lambda"] for t in ws.tried[2:]] == [lam] * n_alpha
    assert ws.valid_metric == max(t["valid_recall@20"] for t in ws.tried[2:]) > 0
    # A learning rate that wrecks the model: the best epoch stays the warm start.
    bad = replace(cfg, lr=50.0, epochs=2, patience=5)
    net, _, hist = train_two_tower(vocab, rows, valid, bad, warm=ws)
    assert hist.best_epoch == 0 and hist.best_metric == ws.valid_metric
    assert [e["epoch"] for e in hist.epochs] == [1.0, 2.0]
    assert max(e["epoch_valid_recall_20"] for e in hist.epochs) < ws.valid_metric
    known = np.flatnonzero(np.abs(ws.history).sum(1) > 0)
    np.testing.assert_allclose(
        net.history.weight[1:].detach().numpy()[known], ws.history[known], atol=1e-6
    )
    # The start is kept with its popularity prior as the item bias.
    assert ws.bias is not None and ws.alpha > 0
    np.testing.assert_allclose(net.item_bias.weight[1:, 0].detach().numpy(), ws.bias, rtol=1e-6)
    # Fine-tuning starts from the start without the prior: the fine-tuned (and averaged)
    # weights are those of the prior-less start.
    c = replace(cfg, epochs=2)
    a, _, _ = train_two_tower(vocab, rows, None, c, warm=ws)
    b, _, _ = train_two_tower(vocab, rows, None, c, warm=replace(ws, bias=None))
    for name, w in a.state_dict().items():
        np.testing.assert_array_equal(w.numpy(), b.state_dict()[name].numpy())
    # And early stopping's patience counts from the prior-less start: a start with a prior
    # that no epoch beats still lets the same epochs run as the prior-less start does.
    c = replace(cfg, epochs=8, patience=2, average="none")
    _, _, h_prior = train_two_tower(vocab, rows, valid, c, warm=replace(ws, valid_metric=1.0))
    plain = replace(ws, bias=None, valid_metric=ws.base_metric, base_metric=float("nan"))
    _, _, h_plain = train_two_tower(vocab, rows, valid, c, warm=plain)
    assert h_prior.best_epoch == 0 and h_plain.best_epoch > 0
    assert len(h_prior.epochs) == len(h_plain.epochs) > c.patience


def test_one_se_gain_is_the_paired_mean_and_standard_error() -> None:
    best = np.array([1.0, 0.5, 0.0, 1.0])
    base = np.array([0.5, 0.5, 0.5, 0.0])
    d = best - base  # 0.5, 0, -0.5, 1
    gain, se = one_se_gain(best, base)
    assert gain == pytest.approx(0.25)
    assert se == pytest.approx(np.sqrt(((d - 0.25) ** 2).sum() / 3) / 2)
    assert one_se_gain(best[:1], base[:1])[1] == np.inf


@pytest.mark.slow
def test_a_fine_tuned_epoch_replaces_the_warm_start_only_beyond_one_standard_error() -> None:
    vocab, rows, valid, cfg = _tiny()
    # The start without its popularity prior, where a fine-tuned epoch leads on this data
    # (with the prior none does: the rule would have nothing to decide).
    ws = warm_start(vocab, rows, valid, replace(cfg, prior_alphas=()))
    assert ws is not None and ws.valid_per_user is not None
    assert ws.valid_metric == pytest.approx(ws.valid_per_user.mean())
    c = replace(cfg, epochs=3, average="none")  # the rule on the epochs' own weights
    # The plain best epoch (no rule): on this data an epoch leads the warm start.
    net0, items, h0 = train_two_tower(vocab, rows, valid, replace(c, fine_tune_min_se=0.0), warm=ws)
    assert h0.best_epoch > 0 and h0.best_metric > ws.valid_metric
    gain, se = one_se_gain(valid_per_user(net0, items, valid, 20), ws.valid_per_user)
    assert gain == pytest.approx(h0.best_metric - ws.valid_metric)
    assert h0.fine_tune == {"epoch": h0.best_epoch, "gain": gain, "se": se, "kept": 1.0}
    # Its lead is small: kept at half a standard error, not at one.
    assert 0.5 * se < gain < se
    _, _, h_half = train_two_tower(vocab, rows, valid, replace(c, fine_tune_min_se=0.5), warm=ws)
    assert h_half.best_epoch == h0.best_epoch and h_half.fine_tune["kept"] == 1.0
    net1, _, h1 = train_two_tower(vocab, rows, valid, replace(c, fine_tune_min_se=1.0), warm=ws)
    assert h1.best_epoch == 0 and h1.best_metric == ws.valid_metric
    assert h1.fine_tune["epoch"] == h0.best_epoch and h1.fine_tune["kept"] == 0.0
    assert len(h1.epochs) == len(h0.epochs)  # the same epochs ran; only the choice differs
    known = np.flatnonzero(np.abs(ws.history).sum(1) > 0)
    np.testing.assert_allclose(
        net1.history.weight[1:].detach().numpy()[known], ws.history[known], atol=1e-6
    )
    assert valid_per_user(net1, items, valid, 20).mean() == pytest.approx(ws.valid_metric)


@pytest.mark.slow
def test_refit_uses_train_plus_validation_and_the_chosen_epochs() -> None:
    data = generate(TINY)
    split = time_split(data)
    vocab = build_vocab(data)
    cfg = replace(TwoTowerConfig(), dim=8, epochs=3, progress=False, ease_lambdas=(20.0,))
    tc = TrainConfig(model=cfg)
    rows = train_rows(split, vocab, tc)
    valid = build_eval_set(
        "valid", split.train, split.valid, vocab, data.target_events, now=query_times(split)[0]
    )
    both = pd.concat([split.train, split.valid], ignore_index=True)
    rows_tv = train_rows(split, vocab, tc, both)
    only_valid = np.setdiff1d(np.unique(rows_tv.items), np.unique(rows.items))
    assert len(only_valid) > 0
    # Chosen at epoch 0 (training wrecked by the learning rate): the refit is the warm
    # start recomputed on train + validation with the chosen λ, and nothing else.
    _, _, hist, chosen = select_two_tower(vocab, rows, valid, replace(cfg, lr=50.0))
    assert hist.best_epoch == 0 and hist.warm_start["lambda"] == 20.0
    net, items, h = refit_two_tower(vocab, rows_tv, chosen, hist)
    assert h.epochs == [] and items.known[only_valid].all()
    x = history_matrix(rows_tv, vocab.n_items)
    p, _ = ease_factors((x.T @ x).toarray(), 20.0, cfg.dim, cfg.warm_scale)
    np.testing.assert_allclose(net.history.weight[1:].detach().numpy(), p, atol=1e-6)
    # Its popularity prior too: the chosen alpha, the popularity of train + validation.
    alpha = hist.warm_start["prior_alpha"]
    assert alpha in cfg.prior_alphas
    np.testing.assert_allclose(
        net.item_bias.weight[1:, 0].detach().numpy(),
        alpha * popularity_prior(item_popularity(rows_tv, vocab.n_items)),
        rtol=1e-6,
    )
    # Chosen after some epochs: the refit trains exactly that many on train + validation.
    _, _, hist, chosen = select_two_tower(vocab, rows, valid, replace(cfg, lr=5e-3, epochs=2))
    net, items, h = refit_two_tower(vocab, rows_tv, chosen, replace(hist, best_epoch=2))
    assert [e["epoch"] for e in h.epochs] == [1.0, 2.0]
    assert np.abs(net.history.weight[1 + only_valid].detach().numpy()).sum() > 0


@pytest.mark.slow
def test_averaged_model_is_the_mean_of_the_warm_start_and_the_epoch_and_is_what_is_chosen() -> None:
    vocab, rows, valid, cfg = _tiny()
    ws = warm_start(vocab, rows, valid, replace(cfg, prior_alphas=()))  # an epoch leads it
    assert ws is not None
    start = new_net(vocab, cfg)
    apply_warm_start(start, ws)
    # A refit (no validation): the same 2 epochs, then the mean with the start's weights.
    c = replace(cfg, epochs=2)
    plain, _, _ = train_two_tower(vocab, rows, None, replace(c, average="none"), warm=ws)
    avg, items, _ = train_two_tower(vocab, rows, None, replace(c, average="warm"), warm=ws)
    s0, s1, sa = start.state_dict(), plain.state_dict(), avg.state_dict()
    moved = 0
    for name, w in sa.items():
        if w.is_floating_point():
            np.testing.assert_allclose(w.numpy(), ((s0[name] + s1[name]) / 2).numpy(), atol=1e-6)
            moved += int(not torch.allclose(s0[name], s1[name]))
    assert moved >= 3  # training moved the weights: the mean is neither of them
    # With validation: each epoch's candidate is the averaged model, and the net returned
    # is the one whose validation metric was the best (not the raw epoch behind it).
    net, items, hist = train_two_tower(
        vocab, rows, valid, replace(c, average="warm", epochs=3), warm=ws
    )
    assert hist.best_epoch > 0
    assert valid_per_user(net, items, valid, 20).mean() == pytest.approx(hist.best_metric)
    raw, _, _ = train_two_tower(
        vocab, rows, None, replace(c, average="none", epochs=hist.best_epoch), warm=ws
    )
    mean = {k: (s0[k] + v) / 2 if v.is_floating_point() else v for k, v in raw.state_dict().items()}
    for name, w in net.state_dict().items():
        np.testing.assert_allclose(w.numpy(), mean[name].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="average"):
        train_two_tower(vocab, rows, None, replace(c, average="ema"), warm=ws)
