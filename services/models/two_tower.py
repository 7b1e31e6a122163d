"""Serving side of the two-tower retrieval model: feature encoding, towers, the bundle.

This module is what the retrieval service imports. It depends on numpy, torch, faiss and
the standard library only (never on ``training``): the training pipeline imports the
tower definition and the feature encoders from here, so training and serving share one
definition of every feature.

A bundle is a directory::

    config.json            format_version, model_type, dim (= model_dim + 1), model_dim,
                           n_items, metric, feature config
    vocab.json             category / surface / country / segment vocabularies
    items.json             item_ids (row order) and their categories
    item_price.npy         float32 [n_items]
    item_embeddings.npy    float32 [n_items, dim], ``[v, b]`` (item vector, item bias),
                           row i = items.json[i]; a user vector is ``[u, 1]``, so the
                           inner product is the model's score ``u · v + b``
    towers.pt              state dict of both towers (loaded with weights_only=True)
    index.faiss            FAISS index over item_embeddings, ids == rows, inner product
    popularity.json        [[item_id, score], ...] descending (fallback)
    complements.json       {item_id: [[item_id, score], ...]} best first (cross-sell from
                           baskets; optional: bundles without it have no complements)
    eval.json              evaluation report of the training run (optional)
    manifest.json          sha256 and size of every file above

Format 2 (this one) is the linear two-tower with item bias; format 1 bundles (cosine
towers with MLPs) are refused with a BundleError.

Integer rows stay inside the bundle: every public method speaks retailer string ids.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch import nn

from mercato.features import PRICE_BANDS
from services.models.manifest import verify_manifest, write_manifest

FORMAT_VERSION = 2
MODEL_TYPE = "two-tower"
SURFACES = ("", "home", "product", "cart", "checkout", "buy_again", "email", "search")
REQUIRED_FILES = (
    "config.json",
    "vocab.json",
    "items.json",
    "item_price.npy",
    "item_embeddings.npy",
    "towers.pt",
    "index.faiss",
    "popularity.json",
)
OPTIONAL_FILES = ("complements.json", "eval.json")


@dataclass
class UserQuery:
    """What serving knows about a customer at request time."""

    recent_item_ids: list[str]  # newest first
    purchased_item_ids: list[str]
    cart_item_ids: list[str]
    anchor_item_id: str = ""
    surface: str = ""  # "home","product","cart","checkout","buy_again","email"
    country: str = ""
    segment: str = ""
    price_band: str = ""  # "low","mid","high",""
    category_affinity: dict[str, float] = field(default_factory=dict)


@dataclass
class ItemFeatures:
    """Catalog features of one item; the id may be unknown to the model (cold start)."""

    item_id: str
    category: str = ""
    price: float = 0.0
    attributes: dict[str, str] = field(default_factory=dict)


class BundleError(Exception):
    """A bundle is missing, corrupt or inconsistent."""


# --------------------------------------------------------------------------- features


def attribute_tokens(attributes: dict[str, str], buckets: int, max_attrs: int) -> list[int]:
    """Hash ``key=value`` pairs into ``1..buckets`` (0 is padding), sorted by key.

    crc32 is stable across processes and platforms, so an attribute value never seen in
    training still lands in a fixed bucket.
    """
    out = []
    for key in sorted(attributes)[:max_attrs]:
        value = attributes[key]
        if value is None or value == "":
            continue
        out.append(1 + zlib.crc32(f"{key}={value}".encode()) % buckets)
    return out


def price_buckets(prices: np.ndarray, boundaries: list[float]) -> np.ndarray:
    """Fine price bucket per price: 1..len(boundaries)+1; 0 for an unknown (<= 0) price."""
    p = np.asarray(prices, dtype=np.float64)
    b = 1 + np.searchsorted(np.asarray(boundaries, dtype=np.float64), p, side="right")
    return np.where(p > 0, b, 0).astype(np.int64)


def price_band_of(price: float, band_boundaries: list[float]) -> str:
    """Coarse band ("low", "mid", "high") of a price; "" when unknown."""
    if not price or price <= 0 or math.isnan(price):
        return ""
    lo, hi = band_boundaries
    return "low" if price < lo else ("mid" if price < hi else "high")


def _pad(rows: list[list[int]], dim: int) -> np.ndarray:
    out = np.zeros((len(rows), dim), dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[:dim]
        out[i, : len(r)] = r
    return out


# --------------------------------------------------------------------------- towers


def history_bags(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged item-index lists as (flat indices, offsets) for ``encode_user``."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(lengths.sum()))
    return flat, offsets


class TwoTowerNet(nn.Module):
    """User and item towers; the score of an item for a user is ``u · v + b``.

    - item tower: ``v`` = id embedding + a content residual (category, fine price bucket,
      hashed attributes; small initial weights, so the id carries the collaborative
      signal and the content what generalises), ``b`` = id bias + category bias. Item
      index 0 is "unknown item": its id embedding and bias are fixed zeros, so a new item
      gets ``v`` and ``b`` from its features alone.
    - user tower: the sum of the history items' input embeddings (id + category
      residual) scaled by ``1/sqrt(n)`` (n = distinct known items), plus embeddings of
      the surface, country, segment and price band, plus a learned base vector.

    Both towers return augmented vectors of size ``dim + 1``: items ``[v, b]``, users
    ``[u, 1]``, so a plain inner-product index ranks exactly as the model scores.
    """

    item_category: torch.Tensor

    def __init__(
        self,
        n_items: int,
        n_categories: int,
        n_surfaces: int,
        n_countries: int,
        n_segments: int,
        n_price_buckets: int,
        attr_buckets: int,
        dim: int = 64,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.n_categories = n_categories
        self.item_id = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.item_bias = nn.Embedding(n_items + 1, 1, padding_idx=0)
        self.category = nn.Embedding(n_categories, dim, padding_idx=0)
        self.category_bias = nn.Embedding(n_categories, 1, padding_idx=0)
        self.price = nn.Embedding(n_price_buckets + 2, dim, padding_idx=0)
        self.attrs = nn.EmbeddingBag(attr_buckets + 1, dim, mode="mean", padding_idx=0)
        self.history = nn.EmbeddingBag(n_items + 1, dim, mode="sum", padding_idx=0)
        self.history_category = nn.EmbeddingBag(n_categories, dim, mode="sum", padding_idx=0)
        self.surface = nn.Embedding(n_surfaces, dim)
        self.country = nn.Embedding(n_countries, dim)
        self.segment = nn.Embedding(n_segments, dim)
        self.band = nn.Embedding(len(PRICE_BANDS), dim)
        self.user_base = nn.Parameter(torch.zeros(dim))
        # Category of every item row (0 = unknown).
        self.register_buffer("item_category", torch.zeros(n_items + 1, dtype=torch.long))
        with torch.no_grad():
            for emb, std in (
                (self.item_id, 0.05),
                (self.history, 0.05),
                (self.history_category, 0.01),
                (self.category, 0.01),
                (self.price, 0.01),
                (self.attrs, 0.01),
                (self.surface, 0.01),
                (self.country, 0.01),
                (self.segment, 0.01),
                (self.band, 0.01),
            ):
                nn.init.normal_(emb.weight, std=std)
            for emb in (
                self.item_id,
                self.history,
                self.history_category,
                self.category,
                self.price,
                self.attrs,
            ):
                emb.weight[0].zero_()
            self.item_bias.weight.zero_()
            self.category_bias.weight.zero_()

    # -- item tower
    def encode_item(
        self, item: torch.Tensor, cat: torch.Tensor, price: torch.Tensor, attrs: torch.Tensor
    ) -> torch.Tensor:
        """item [B] (0 = unknown), cat [B], price bucket [B], attrs [B, A] -> [B, dim+1]."""
        v = self.item_id(item) + self.category(cat) + self.price(price) + self.attrs(attrs)
        b = self.item_bias(item) + self.category_bias(cat)
        return torch.cat([v, b], dim=1)

    # -- user tower
    def encode_user(
        self,
        history: torch.Tensor,
        offsets: torch.Tensor,
        surface: torch.Tensor,
        country: torch.Tensor,
        segment: torch.Tensor,
        band: torch.Tensor,
    ) -> torch.Tensor:
        """history: flat item indices (0 = ignored) of B bags starting at ``offsets``;
        context ids [B] -> [B, dim+1]."""
        lengths = torch.diff(offsets, append=torch.tensor([len(history)]))
        bag_id = torch.repeat_interleave(torch.arange(len(offsets)), lengths)
        n = torch.zeros(len(offsets)).index_add_(0, bag_id, (history > 0).float())
        per_item = n.clamp_min(1.0).rsqrt()[bag_id]
        cats = self.item_category[history]
        u = (
            self.history(history, offsets, per_sample_weights=per_item)
            + self.history_category(cats, offsets, per_sample_weights=per_item)
            + self.surface(surface)
            + self.country(country)
            + self.segment(segment)
            + self.band(band)
            + self.user_base
        )
        return torch.cat([u, torch.ones(len(u), 1)], dim=1)


def build_net(config: dict[str, Any], vocab: dict[str, list[str]]) -> TwoTowerNet:
    """The towers as described by a bundle's config and vocabularies."""
    f = config["features"]
    return TwoTowerNet(
        n_items=int(config["n_items"]),
        n_categories=len(vocab["category"]),
        n_surfaces=len(vocab["surface"]),
        n_countries=len(vocab["country"]),
        n_segments=len(vocab["segment"]),
        n_price_buckets=len(f["price_boundaries"]) + 1,
        attr_buckets=int(f["attr_buckets"]),
        dim=int(config["model_dim"]),
    )


# --------------------------------------------------------------------------- index


def search_scores(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(inner-product scores, rows) of the top ``k`` per query. An L2-augmented HNSW
    (``training.index``: an ``IndexPreTransform`` padding queries with a 0) returns L2
    distances ``|q|² + M² - 2 q·x``; they are turned back into ``q·x``."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    dist, rows = index.search(q, k)
    if isinstance(index, faiss.IndexPreTransform):
        inner = faiss.downcast_index(index.index)
        m2 = float((np.asarray(inner.reconstruct(0), dtype=np.float64) ** 2).sum())
        q2 = (q.astype(np.float64) ** 2).sum(1, keepdims=True)
        dist = ((q2 + m2 - dist) / 2.0).astype(np.float32)
    return dist, rows


# --------------------------------------------------------------------------- bundle


class TwoTowerBundle:
    """Everything serving needs to encode users and items and search the item index."""

    def __init__(
        self,
        config: dict[str, Any],
        vocab: dict[str, list[str]],
        item_ids: list[str],
        item_category: list[str],
        item_price: np.ndarray,
        item_embeddings: np.ndarray,
        net: TwoTowerNet,
        index: faiss.Index,
        popularity: list[tuple[str, float]],
        complements: dict[str, list[tuple[str, float]]] | None = None,
        eval_report: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.vocab = vocab
        self.item_ids = item_ids
        self.item_category = item_category
        self.item_price = np.asarray(item_price, dtype=np.float32)
        self.item_embeddings = np.ascontiguousarray(item_embeddings, dtype=np.float32)
        self.net = net.eval()
        self.index = index
        self.popularity = popularity
        self._complements = complements
        self._complements_path: Path | None = None
        self.eval_report = eval_report or {}
        self._row = {iid: i for i, iid in enumerate(item_ids)}
        self._lookup = {k: {v: i for i, v in enumerate(vals)} for k, vals in vocab.items()}
        self.check()

    # -- consistency
    def check(self) -> None:
        """Raise BundleError unless every part agrees on the number of items and dim."""
        c = self.config
        for key in (
            "dim",
            "model_dim",
            "n_items",
            "metric",
            "model_type",
            "format_version",
            "features",
        ):
            if key not in c:
                raise BundleError(f"config.json has no {key!r}")
        if c["format_version"] != FORMAT_VERSION:
            raise BundleError(f"format_version {c['format_version']} != {FORMAT_VERSION}")
        if c["model_type"] != MODEL_TYPE or c["metric"] != "ip":
            raise BundleError(f"not a {MODEL_TYPE} bundle with metric ip: {c['model_type']}")
        n, dim = int(c["n_items"]), int(c["dim"])
        if dim != int(c["model_dim"]) + 1:
            raise BundleError(f"dim {dim} != model_dim + 1 ({c['model_dim']} + 1)")
        if self.item_embeddings.shape != (n, dim):
            raise BundleError(f"item_embeddings shape {self.item_embeddings.shape} != {(n, dim)}")
        if len(self.item_ids) != n or len(self.item_category) != n or len(self.item_price) != n:
            raise BundleError("items.json / item_price.npy do not have n_items rows")
        if len(self._row) != n:
            raise BundleError("items.json has duplicate item ids")
        if self.index.ntotal != n or self.index.d != dim:
            raise BundleError(f"index has {self.index.ntotal} x {self.index.d}, want {n} x {dim}")
        if not np.isfinite(self.item_embeddings).all():
            raise BundleError("item_embeddings contain NaN or inf")
        for key in ("category", "surface", "country", "segment"):
            if key not in self.vocab or not self.vocab[key] or self.vocab[key][0] != "":
                raise BundleError(f"vocab.json: {key!r} missing or does not start with ''")

    # -- cross-sell
    @property
    def complement_pairs(self) -> dict[str, list[tuple[str, float]]]:
        """Every item's complements (loaded from complements.json on first use)."""
        if self._complements is None:
            pairs: dict[str, list[tuple[str, float]]] = {}
            p = self._complements_path
            if p is not None and p.is_file():
                try:
                    raw = json.loads(p.read_text())
                    pairs = {str(k): [(str(i), float(sc)) for i, sc in v] for k, v in raw.items()}
                except (OSError, ValueError, TypeError) as e:
                    raise BundleError(f"{p}: unreadable complements: {e}") from e
            self._complements = pairs
        return self._complements

    def complements(self, item_id: str, n: int = 10) -> list[tuple[str, float]]:
        """Up to ``n`` items bought together with ``item_id`` as (item_id, score), best
        first; empty for an unknown item or a bundle without complements."""
        if n <= 0:
            return []
        return self.complement_pairs.get(item_id, [])[:n]

    @property
    def dim(self) -> int:
        return int(self.config["dim"])

    def row_of(self, item_id: str) -> int | None:
        """Row of an item in item_embeddings / FAISS id, None when unknown."""
        return self._row.get(item_id)

    # -- encoding
    def _item_index(self, ids: list[str]) -> list[int]:
        out = []
        for i in ids:
            r = self._row.get(i)
            if r is not None:
                out.append(r + 1)
        return out

    def _vocab_index(self, key: str, value: str) -> int:
        return self._lookup[key].get(value, 0)

    def history_rows(self, q: UserQuery) -> list[int]:
        """Item indices (row + 1) of a query's history: distinct known items of recent,
        purchased, cart and anchor, in that order, at most ``max_history`` (0 = all)."""
        seen: set[int] = set()
        out: list[int] = []
        for ids in (q.recent_item_ids, q.purchased_item_ids, q.cart_item_ids):
            for i in ids:
                r = self._row.get(i)
                if r is not None and r not in seen:
                    seen.add(r)
                    out.append(r + 1)
        r = self._row.get(q.anchor_item_id) if q.anchor_item_id else None
        if r is not None and r not in seen:
            out.append(r + 1)
        limit = int(self.config["features"].get("max_history", 0))
        return out[:limit] if limit else out

    def context_ids(self, q: UserQuery) -> tuple[int, int, int, int]:
        """(surface, country, segment, price band) indices of a query; 0 when unknown."""
        band = PRICE_BANDS.index(q.price_band) if q.price_band in PRICE_BANDS else 0
        return (
            self._vocab_index("surface", q.surface),
            self._vocab_index("country", q.country),
            self._vocab_index("segment", q.segment),
            band,
        )

    @torch.no_grad()
    def encode_users(self, queries: list[UserQuery]) -> np.ndarray:
        """User-tower vectors float32 [B, dim] (last component 1); unknown item ids are
        ignored."""
        if not queries:
            return np.zeros((0, self.dim), dtype=np.float32)
        flat, offsets = history_bags([self.history_rows(q) for q in queries])
        ctx = torch.tensor([self.context_ids(q) for q in queries], dtype=torch.long)
        out = self.net.encode_user(
            torch.from_numpy(flat), torch.from_numpy(offsets), *ctx.unbind(1)
        )
        return out.numpy().astype(np.float32)

    def item_feature_arrays(self, items: list[ItemFeatures]) -> tuple[np.ndarray, ...]:
        """Integer feature arrays (id, category, price bucket, attribute tokens)."""
        f = self.config["features"]
        ids = np.array([self._row.get(it.item_id, -1) + 1 for it in items], dtype=np.int64)
        cats = np.array([self._vocab_index("category", it.category) for it in items])
        prices = price_buckets(np.array([it.price for it in items]), f["price_boundaries"])
        attrs = _pad(
            [attribute_tokens(it.attributes, f["attr_buckets"], f["max_attrs"]) for it in items],
            f["max_attrs"],
        )
        return ids, cats.astype(np.int64), prices, attrs

    @torch.no_grad()
    def encode_items(self, items: list[ItemFeatures]) -> np.ndarray:
        """Item-tower vectors float32 [B, dim] (``[v, b]``); an unknown id is embedded
        from its features."""
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids, cats, prices, attrs = self.item_feature_arrays(items)
        out = self.net.encode_item(
            torch.from_numpy(ids),
            torch.from_numpy(cats),
            torch.from_numpy(prices),
            torch.from_numpy(attrs),
        )
        return out.numpy().astype(np.float32)

    def search(self, user_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search: (scores [B, k], rows [B, k]); rows are -1 where fewer exist."""
        return search_scores(self.index, user_vectors, k)

    # -- persistence
    def save(self, path: str | Path) -> None:
        """Write the bundle directory (created if needed) with a checksum manifest."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True))
        (d / "vocab.json").write_text(json.dumps(self.vocab))
        (d / "items.json").write_text(
            json.dumps({"item_ids": self.item_ids, "category": self.item_category})
        )
        np.save(d / "item_price.npy", self.item_price)
        np.save(d / "item_embeddings.npy", self.item_embeddings)
        torch.save(self.net.state_dict(), d / "towers.pt")
        faiss.write_index(self.index, str(d / "index.faiss"))
        (d / "popularity.json").write_text(json.dumps([[i, float(s)] for i, s in self.popularity]))
        (d / "complements.json").write_text(
            json.dumps({k: [[i, float(s)] for i, s in v] for k, v in self.complement_pairs.items()})
        )
        files = [*REQUIRED_FILES, "complements.json"]
        if self.eval_report:
            (d / "eval.json").write_text(json.dumps(self.eval_report, indent=2, sort_keys=True))
            files.append("eval.json")
        write_manifest(d, files, FORMAT_VERSION)

    @classmethod
    def load(
        cls, path: str | Path, verify_checksums: bool = True, index_io_flags: int = 0
    ) -> TwoTowerBundle:
        """Load a bundle directory; BundleError says what is missing or wrong.

        ``index_io_flags`` go to ``faiss.read_index`` (for example
        ``faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY`` to memory-map the index).
        """
        d = Path(path)
        listed = verify_manifest(d, REQUIRED_FILES, BundleError, verify_checksums)["files"]
        try:
            config = json.loads((d / "config.json").read_text())
            vocab = json.loads((d / "vocab.json").read_text())
            items = json.loads((d / "items.json").read_text())
            price = np.load(d / "item_price.npy", allow_pickle=False)
            emb = np.load(d / "item_embeddings.npy", allow_pickle=False)
            popularity = [
                (str(i), float(s)) for i, s in json.loads((d / "popularity.json").read_text())
            ]
            report = (
                json.loads((d / "eval.json").read_text()) if (d / "eval.json").is_file() else {}
            )
            net = build_net(config, vocab)
            state = torch.load(d / "towers.pt", map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
            index = faiss.read_index(str(d / "index.faiss"), index_io_flags)
        except BundleError:
            raise
        except Exception as e:  # any unreadable or inconsistent artifact
            raise BundleError(f"{d}: cannot load bundle: {type(e).__name__}: {e}") from e
        bundle = cls(
            config=config,
            vocab=vocab,
            item_ids=[str(x) for x in items["item_ids"]],
            item_category=[str(x) for x in items["category"]],
            item_price=price,
            item_embeddings=emb,
            net=net,
            index=index,
            popularity=popularity,
            complements=None,
            eval_report=report,
        )
        # Read lazily on first use; only a file the manifest vouches for.
        if "complements.json" in listed:
            bundle._complements_path = d / "complements.json"
        return bundle
