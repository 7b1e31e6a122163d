"""Serving side of the two-tower retrieval model: feature encoding, towers, the bundle.

This module is what the retrieval service imports. It depends on numpy, faiss and the
standard library only: never on torch (a serving pod holds the towers' weights as arrays
and computes both towers in NumPy) nor on ``training``. The training pipeline imports the
tower definition (:class:`TwoTowerNet`, in :mod:`services.models.two_tower_net`, reached
through this module on first use) and the feature encoders from here, so training and
serving share one definition of every feature. The NumPy towers are checked equal to the
torch ones in the tests (``tests/retrieval/test_model.py``), not in every pod.

A bundle is a directory::

    config.json            format_version, model_type, dim (= model_dim + 1), model_dim,
                           n_items, metric, feature config
    vocab.json             category / surface / country / segment vocabularies
    items.json             item_ids (row order) and their categories
    item_price.npy         float32 [n_items]
    item_embeddings.npy    float32 [n_items, dim], ``[v, b]`` (item vector, item bias),
                           row i = items.json[i]; a user vector is ``[u, 1]``, so the
                           inner product is the model's score ``u · v + b``
    towers.npz             state dict of both towers as NumPy arrays (``np.savez``, read
                           without pickle): ``history.weight``, ``item_id.weight``, ...
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import faiss
import numpy as np

from mercato.features import PRICE_BANDS
from services.models.arrays import load_npy, load_npz, release
from services.models.manifest import verify_manifest, write_manifest

if TYPE_CHECKING:  # torch is imported only when training code asks for the network
    from services.models.two_tower_net import TwoTowerNet as TwoTowerNet
    from services.models.two_tower_net import build_net as build_net

FORMAT_VERSION = 2
MODEL_TYPE = "two-tower"
SURFACES = ("", "home", "product", "cart", "checkout", "buy_again", "email", "search")
REQUIRED_FILES = (
    "config.json",
    "vocab.json",
    "items.json",
    "item_price.npy",
    "item_embeddings.npy",
    "towers.npz",
    "index.faiss",
    "popularity.json",
)
OPTIONAL_FILES = ("complements.json", "eval.json")
# The towers' parameters (state-dict names) and the shape of each, in terms of the
# bundle's config and vocabularies: what ``check`` verifies before a version may serve.
WEIGHT_NAMES = (
    "item_id.weight",
    "item_bias.weight",
    "category.weight",
    "category_bias.weight",
    "price.weight",
    "attrs.weight",
    "history.weight",
    "history_category.weight",
    "surface.weight",
    "country.weight",
    "segment.weight",
    "band.weight",
    "user_base",
    "item_category",
)


def __getattr__(name: str) -> Any:
    """``TwoTowerNet`` and ``build_net`` live with torch in ``two_tower_net``; importing
    them from here (training does) loads torch then, never when serving imports this."""
    if name in ("TwoTowerNet", "build_net"):
        from services.models import two_tower_net

        return getattr(two_tower_net, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    # TwoTowerBundle.known_rows, kept for the bundle that computed it (the user tower
    # and item-to-item both read it in one Retrieve): (the bundle's id -> row map, rows).
    _known_rows: tuple[object, list[int]] | None = field(
        default=None, init=False, repr=False, compare=False
    )


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
        net: TwoTowerNet | Mapping[str, np.ndarray],
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
        self._net: TwoTowerNet | None = None
        if isinstance(net, Mapping):
            self.weights = {k: np.asarray(v) for k, v in net.items()}
        else:  # a trained torch network: keep it for training code, serve its arrays
            from services.models.two_tower_net import net_weights

            self._net = net.eval()
            self.weights = net_weights(net)
        self.index = index
        self.popularity = popularity
        self._complements = complements
        self._complements_path: Path | None = None
        self.eval_report = eval_report or {}
        self._row = {iid: i for i, iid in enumerate(item_ids)}
        self._lookup = {k: {v: i for i, v in enumerate(vals)} for k, vals in vocab.items()}
        self.check()
        self.release()

    def release(self) -> None:
        """Drop the pages of memory-mapped tables from the resident set (after checks
        or index builds that read them all); no-op for tables in private memory."""
        for arr in (self.item_embeddings, *self._w.values()):
            release(arr)

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
        self._check_weights()

    def _check_weights(self) -> None:
        """Every tower parameter present with the shape the config implies; float32
        copies for the NumPy towers (``_w``)."""
        c, w = self.config, self.weights
        n, d = int(c["n_items"]), int(c["model_dim"])
        n_cat = len(self.vocab["category"])
        f = c["features"]
        want = {
            "item_id.weight": (n + 1, d),
            "item_bias.weight": (n + 1, 1),
            "category.weight": (n_cat, d),
            "category_bias.weight": (n_cat, 1),
            "price.weight": (len(f["price_boundaries"]) + 3, d),
            "attrs.weight": (int(f["attr_buckets"]) + 1, d),
            "history.weight": (n + 1, d),
            "history_category.weight": (n_cat, d),
            "surface.weight": (len(self.vocab["surface"]), d),
            "country.weight": (len(self.vocab["country"]), d),
            "segment.weight": (len(self.vocab["segment"]), d),
            "band.weight": (len(PRICE_BANDS), d),
            "user_base": (d,),
            "item_category": (n + 1,),
        }
        extra = sorted(set(w) - set(want))
        if extra:
            raise BundleError(f"towers.npz has parameters this server does not know: {extra}")
        for name, shape in want.items():
            if name not in w:
                raise BundleError(f"towers.npz has no {name!r}")
            if tuple(w[name].shape) != shape:
                raise BundleError(f"towers.npz: {name} has shape {w[name].shape}, want {shape}")
            if w[name].dtype.kind == "f" and not np.isfinite(w[name]).all():
                raise BundleError(f"towers.npz: {name} contains NaN or inf")
        cats = w["item_category"]
        if cats.dtype.kind not in "iu" or (len(cats) and (cats.min() < 0 or cats.max() >= n_cat)):
            raise BundleError("towers.npz: item_category is not a category index per item")
        self._w = {
            k: (np.ascontiguousarray(v, dtype=np.float32) if k != "item_category" else v)
            for k, v in w.items()
        }
        self._w["item_category"] = np.asarray(cats, dtype=np.int64)

    @property
    def net(self) -> TwoTowerNet:
        """The towers as a torch module (imports torch; for training code and tests:
        serving computes the towers from :attr:`weights` in NumPy)."""
        if self._net is None:
            from services.models.two_tower_net import net_from_weights

            self._net = net_from_weights(self.config, self.vocab, self.weights)
        return self._net

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

    def known_rows(self, q: UserQuery) -> list[int]:
        """Rows of the distinct known items of a query's recent, purchased and cart
        items, in that order (first occurrence). Computed once per query and bundle:
        the user tower and item-to-item both read it (a query is not changed after its
        first use)."""
        got = q._known_rows
        if got is not None and got[0] is self._row:
            return got[1]
        get = self._row.get
        found = map(get, (*q.recent_item_ids, *q.purchased_item_ids, *q.cart_item_ids))
        out = list(dict.fromkeys(r for r in found if r is not None))
        q._known_rows = (self._row, out)
        return out

    def history_rows(self, q: UserQuery) -> list[int]:
        """Item indices (row + 1) of a query's history: distinct known items of recent,
        purchased, cart and anchor, in that order, at most ``max_history`` (0 = all)."""
        known = self.known_rows(q)
        out = [r + 1 for r in known]
        r = self._row.get(q.anchor_item_id) if q.anchor_item_id else None
        if r is not None and r not in known:
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

    def encode_user(self, q: UserQuery) -> np.ndarray:
        """User-tower vector float32 [dim] (last component 1) of one query, in NumPy:
        ``TwoTowerNet.encode_user``'s math (history items' id + category embeddings
        summed and scaled by ``1/sqrt(n)``, plus the context embeddings and the base)."""
        w = self._w
        rows = self.history_rows(q)
        s, c, g, b = self.context_ids(q)
        u = (
            w["user_base"]
            + w["surface.weight"][s]
            + w["country.weight"][c]
            + w["segment.weight"][g]
            + w["band.weight"][b]
        )
        if rows:
            r = np.asarray(rows, dtype=np.int64)
            h = w["history.weight"][r] + w["history_category.weight"][w["item_category"][r]]
            u = u + h.sum(0) / np.float32(np.sqrt(len(rows)))
        return np.concatenate([u, np.ones(1, np.float32)]).astype(np.float32)

    def encode_users(self, queries: list[UserQuery]) -> np.ndarray:
        """User-tower vectors float32 [B, dim] (last component 1); unknown item ids are
        ignored."""
        if not queries:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self.encode_user(q) for q in queries])

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

    def encode_items(self, items: list[ItemFeatures]) -> np.ndarray:
        """Item-tower vectors float32 [B, dim] (``[v, b]``) in NumPy, as
        ``TwoTowerNet.encode_item``; an unknown id is embedded from its features."""
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        w = self._w
        ids, cats, prices, attrs = self.item_feature_arrays(items)
        # EmbeddingBag(mode="mean", padding_idx=0): the mean over non-padding tokens,
        # zeros for a bag of padding only.
        tokens = (attrs > 0).astype(np.float32)
        count = tokens.sum(1, keepdims=True)
        attr_mean = (w["attrs.weight"][attrs] * tokens[:, :, None]).sum(1) / np.maximum(count, 1)
        v = (
            w["item_id.weight"][ids]
            + w["category.weight"][cats]
            + w["price.weight"][prices]
            + attr_mean
        )
        b = w["item_bias.weight"][ids] + w["category_bias.weight"][cats]
        return np.concatenate([v, b], axis=1).astype(np.float32)

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
        np.savez(d / "towers.npz", allow_pickle=False, **cast(dict[str, Any], self.weights))
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
        cls,
        path: str | Path,
        verify_checksums: bool = True,
        index_io_flags: int = 0,
        mmap: bool = False,
    ) -> TwoTowerBundle:
        """Load a bundle directory; BundleError says what is missing or wrong.

        ``index_io_flags`` go to ``faiss.read_index`` (for example
        ``faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY`` to memory-map the index).
        With ``mmap`` the item embeddings and the towers' tables are memory-mapped
        read-only (checked at load, then released from the resident set: a request reads
        the rows it needs).
        """
        d = Path(path)
        listed = verify_manifest(d, REQUIRED_FILES, BundleError, verify_checksums)["files"]
        try:
            config = json.loads((d / "config.json").read_text())
            vocab = json.loads((d / "vocab.json").read_text())
            items = json.loads((d / "items.json").read_text())
            price = np.load(d / "item_price.npy", allow_pickle=False)
            emb = load_npy(d / "item_embeddings.npy", mmap)
            popularity = [
                (str(i), float(s)) for i, s in json.loads((d / "popularity.json").read_text())
            ]
            report = (
                json.loads((d / "eval.json").read_text()) if (d / "eval.json").is_file() else {}
            )
            weights = load_npz(d / "towers.npz", mmap)
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
            net=weights,
            index=index,
            popularity=popularity,
            complements=None,
            eval_report=report,
        )
        # Read lazily on first use; only a file the manifest vouches for.
        if "complements.json" in listed:
            bundle._complements_path = d / "complements.json"
        return bundle
