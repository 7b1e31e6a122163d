"""The synthetic data set as the profile service loads it (``mercato load --data synthetic``).

:func:`profile_dataset` is the ``synthetic`` adapter the ``mercato`` command registers
with the profile service (:func:`services.profile.datasets.register_adapter`); this
module imports only the shared API (:mod:`mercato.v1`, :mod:`mercato.datasets`), never
the profile service. ``path`` is a folder written by ``mercato train generate --out <folder>``
(:func:`training.synthetic.write_synthetic`); the profile service then holds exactly the
customers, catalog and events that ``mercato train retrieval --data synthetic --path
<folder>`` trains on.

Mapping: views, add-to-carts and purchases keep their type (quantity 1, the item's
price); a session's events share ``session_id`` ``<user>:<session>``, purchases also
carry it as ``order_id``; surfaces keep their names. Items get a title from brand,
colour and category, their attributes, a created_at at their first event (the
generator launches items during the period) and a stock drawn from the seed (about 5 %
out of stock, for the ranking rules). Event ids are ``syn-<fingerprint>-<row>``, so a
re-run of the same load is a no-op.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from mercato.datasets import DatasetUnavailable
from training.data import RetailData

#: Leaf categories of the synthetic tree that people buy again and again (buy-again surface).
REPLENISHABLE = frozenset(
    {"coffee", "snacks", "tea", "pasta", "sauces", "skincare", "hair_care", "makeup", "socks"}
)


def is_replenishable(category: str) -> bool:
    """``grocery/tea`` and its copies in bigger catalogs (``grocery/tea_2``)."""
    leaf = re.sub(r"_\d+$", "", category.split("/")[-1])
    return leaf in REPLENISHABLE


_TYPES = {
    "view": "EVENT_TYPE_VIEW",
    "cart": "EVENT_TYPE_ADD_TO_CART",
    "purchase": "EVENT_TYPE_PURCHASE",
}


class SyntheticProfileDataset:
    """A :class:`services.profile.datasets.ProfileDataset` over a written synthetic set."""

    name = "synthetic"
    items_are_partial = False

    def __init__(self, data: RetailData, seed: int = 0) -> None:
        self.data = data
        self.seed = seed
        self._prefix = f"syn-{data.fingerprint()[:8]}"

    def stock(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed + 17)
        n = len(self.data.items)
        return np.where(rng.random(n) < 0.05, 0, rng.integers(1, 200, size=n))

    def items(self) -> Iterator[object]:
        from mercato.v1 import common_pb2

        it = self.data.items
        first = self.data.events.groupby("item_id")["ts"].min()
        t0 = int(self.data.events["ts"].min()) if len(self.data.events) else 0
        attrs = [c for c in it.columns if c.startswith("attr_")]
        stock = self.stock()
        for k, row in enumerate(it.itertuples(index=False)):
            a = {c[len("attr_") :]: str(getattr(row, c)) for c in attrs if getattr(row, c)}
            leaf = str(row.category).split("/")[-1].replace("_", " ")
            title = " ".join(x for x in (a.get("brand", ""), a.get("color", ""), leaf) if x)
            created = int(first.get(row.item_id, t0))
            yield common_pb2.Item(
                item_id=str(row.item_id),
                title=title,
                category=str(row.category),
                price=float(row.price),
                currency="EUR",
                stock=int(stock[k]),
                attributes=a,
                created_at=Timestamp(seconds=created),
                replenishable=is_replenishable(str(row.category)),
            )

    def customers(self) -> Iterator[object]:
        from mercato.v1 import profile_pb2

        for row in self.data.users.itertuples(index=False):
            yield profile_pb2.Customer(customer_id=str(row.user_id), country=str(row.country))

    def events(self) -> Iterator[object]:
        from mercato.v1 import common_pb2

        ev = self.data.events
        order = np.argsort(ev["ts"].to_numpy(), kind="stable")
        price = self.data.items.set_index("item_id")["price"]
        prices = ev["item_id"].map(price).fillna(0.0).to_numpy()
        cols = [ev[c].to_numpy() for c in ("user_id", "item_id", "ts", "event", "session_id")]
        surface = ev["surface"].to_numpy()
        types = {k: getattr(common_pb2, v) for k, v in _TYPES.items()}
        surfaces = {
            k.removeprefix("SURFACE_").lower(): v
            for k, v in common_pb2.Surface.items()
            if v != common_pb2.SURFACE_UNSPECIFIED
        }
        for r in order:
            user, item, ts, kind, sess = (c[r] for c in cols)
            session = f"{user}:{sess}"
            yield common_pb2.Event(
                event_id=f"{self._prefix}-{r}",
                customer_id=str(user),
                type=types[str(kind)],
                item_id=str(item),
                quantity=1,
                price=float(prices[r]),
                timestamp=Timestamp(seconds=int(ts)),
                session_id=session,
                order_id=session if kind == "purchase" else "",
                surface=surfaces.get(str(surface[r]), 0),  # type: ignore[arg-type]
            )

    def event_count(self) -> int | None:
        return len(self.data.events)


def profile_dataset(path: str) -> SyntheticProfileDataset:
    """The synthetic set written to ``path`` by ``mercato train generate``."""
    from training.synthetic import load_synthetic

    d = Path(path)
    if not (d / "events.parquet").is_file():
        raise DatasetUnavailable(
            f"{d} holds no synthetic data set: write one with "
            f"`mercato train generate --out {d}` (then train on the same folder with "
            f"`mercato train retrieval --data synthetic --path {d}`)"
        )
    data = load_synthetic(d)
    seed = int(data.meta.get("generator", {}).get("seed", 0))
    return SyntheticProfileDataset(data, seed)


__all__ = ["SyntheticProfileDataset", "profile_dataset"]
