"""Synthetic retail data: the project's default data set.

The generative story, so that a model which learns has something to learn:

- a catalog of leaf categories (``electronics/phones``) with a latent vector, a price
  level and complementary categories (phones -> phone cases, chargers); items with a
  style inside their category, a brand, a price tier, a long-tail (log-normal) base
  popularity, a launch day (new items appear during the period) and a trend;
- customers with a latent taste (a mix of 1-3 favourite categories and styles plus
  noise, shifted by their country), a price sensitivity, a country and an activity rate;
- sessions that start on a category chosen by taste and by current popularity; views
  that follow the session's category, complements of the item on screen, or a new
  intent; add-to-carts that depend on taste and price fit; purchases or abandoned carts;
  checkout add-ons (a case with the phone); cart-recovery visits in later sessions.

Items are drawn by sampling candidates from the category in proportion to their current
popularity and choosing among them by taste and price fit, which costs O(candidates)
per draw, so the generator scales to 1M items and 10M events. Output is streamed to
Parquet in blocks of users (:func:`write_synthetic`); small data sets can be built in
memory (:func:`generate`). Everything is a function of the config and the seed: blocks
of ``BLOCK_USERS`` users have their own seeded generator, so the output does not depend
on how it is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from training.data import RetailData

BLOCK_USERS = 1000
START_TS = 1_704_067_200  # 2024-01-01T00:00:00Z
DAY = 86_400

# Leaf categories per department, with a typical price (GBP) and complements.
_TREE: dict[str, dict[str, float]] = {
    "electronics": {
        "phones": 450,
        "phone_cases": 18,
        "laptops": 900,
        "laptop_bags": 45,
        "headphones": 90,
        "cameras": 500,
        "memory_cards": 20,
        "chargers": 22,
    },
    "home": {
        "coffee_machines": 180,
        "coffee": 9,
        "cookware": 60,
        "kitchen_tools": 15,
        "bedding": 70,
        "lighting": 40,
    },
    "fashion": {"shoes": 85, "socks": 8, "jackets": 120, "t_shirts": 20, "bags": 60, "belts": 25},
    "beauty": {"skincare": 25, "makeup": 18, "fragrance": 65, "hair_care": 12},
    "sports": {"running": 95, "yoga": 35, "cycling": 300, "water_bottles": 14},
    "toys": {"lego": 55, "board_games": 30, "puzzles": 15, "plush": 18},
    "books": {"fiction": 12, "cooking": 22, "kids": 9, "business": 20},
    "grocery": {"snacks": 4, "tea": 6, "pasta": 3, "sauces": 4},
}
_COMPLEMENTS: dict[str, list[str]] = {
    "phones": ["phone_cases", "chargers", "headphones"],
    "laptops": ["laptop_bags", "chargers"],
    "cameras": ["memory_cards"],
    "coffee_machines": ["coffee"],
    "cookware": ["kitchen_tools"],
    "shoes": ["socks"],
    "jackets": ["t_shirts"],
    "running": ["water_bottles", "socks"],
    "yoga": ["water_bottles"],
    "cycling": ["water_bottles"],
    "pasta": ["sauces"],
    "makeup": ["skincare"],
    "lego": ["board_games"],
    "cooking": ["cookware"],
}
_COUNTRIES = ["GB", "DE", "FR", "NL", "ES", "IT", "IE", "US"]
_COUNTRY_P = [0.45, 0.14, 0.12, 0.08, 0.07, 0.06, 0.04, 0.04]
_COLORS = ["black", "white", "grey", "blue", "red", "green", "beige", "pink"]


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and behaviour of the synthetic data; the same config and seed give the same data."""

    n_users: int = 10_000
    n_items: int = 5_000
    n_categories: int = 40
    days: int = 120
    sessions_per_user: float = 6.0
    latent_dim: int = 16
    candidates: int = 64
    taste_strength: float = 8.0
    category_strength: float = 5.0
    price_strength: float = 1.5
    seed: int = 0


@dataclass
class Catalog:
    """The item side of the generator, kept in memory (1M items: ~100 MB)."""

    item_ids: np.ndarray
    category: np.ndarray  # int leaf index per item
    category_names: list[str]
    price: np.ndarray
    brand: np.ndarray
    color: np.ndarray
    tier: np.ndarray
    latent: np.ndarray  # [n_items, dim] float32
    cat_latent: np.ndarray  # [n_cat, dim]
    style: np.ndarray  # [n_cat, n_styles, dim] style directions inside each category
    cat_log_price: np.ndarray
    cat_weight: np.ndarray
    complements: list[np.ndarray]  # per category: complementary category indices
    # Popularity sampling tables per period: items sorted by category, cumulative weights.
    order: np.ndarray  # item indices sorted by category
    cat_start: np.ndarray  # [n_cat + 1] offsets into order
    period_cum: np.ndarray  # [n_periods, n_items] cumulative weight within category
    period_cat_weight: np.ndarray  # [n_periods, n_cat] total weight of each category
    n_periods: int
    days: int

    def items_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "item_id": self.item_ids,
                "category": np.asarray(self.category_names, dtype=object)[self.category],
                "price": self.price.astype(np.float64).round(2),
                "attr_brand": self.brand,
                "attr_color": self.color,
                "attr_tier": self.tier,
            }
        )


def _category_names(n: int) -> tuple[list[str], list[float], dict[int, list[int]]]:
    leaves = [
        (f"{dept}/{leaf}", price, leaf) for dept, ls in _TREE.items() for leaf, price in ls.items()
    ]
    names, prices, short = [], [], []
    for i in range(n):
        name, price, leaf = leaves[i % len(leaves)]
        if i >= len(leaves):
            name = f"{name}_{i // len(leaves)}"
        names.append(name)
        prices.append(price)
        short.append(leaf)
    comp: dict[int, list[int]] = {}
    for i, leaf in enumerate(short):
        targets = _COMPLEMENTS.get(leaf, [])
        # Complements live in the same copy of the tree (same suffix).
        block = i // len(leaves)
        comp[i] = [
            j
            for j, other in enumerate(short)
            if other in targets and j // len(leaves) == block and j < n
        ]
    return names, prices, comp


def build_catalog(cfg: SyntheticConfig) -> Catalog:
    """Categories, items, their latent vectors and popularity sampling tables."""
    rng = np.random.default_rng([cfg.seed, 0])
    n, dim, n_cat = cfg.n_items, cfg.latent_dim, cfg.n_categories
    names, cat_price, comp = _category_names(n_cat)
    cat_latent = rng.normal(size=(n_cat, dim))
    cat_latent /= np.linalg.norm(cat_latent, axis=1, keepdims=True)
    # Complementary categories are close in taste space.
    for i, js in comp.items():
        for j in js:
            cat_latent[j] = 0.6 * cat_latent[j] + 0.4 * cat_latent[i]
    cat_latent /= np.linalg.norm(cat_latent, axis=1, keepdims=True)
    n_styles = 4
    style = rng.normal(size=(n_cat, n_styles, dim)) * 0.6
    cat_weight = rng.pareto(1.5, size=n_cat) + 0.3
    category = rng.choice(n_cat, size=n, p=cat_weight / cat_weight.sum())
    item_style = rng.integers(0, n_styles, size=n)
    latent = cat_latent[category] + style[category, item_style] + rng.normal(size=(n, dim)) * 0.35
    latent /= np.linalg.norm(latent, axis=1, keepdims=True)
    quality = rng.normal(size=n)
    cat_log_price = np.log(np.asarray(cat_price))
    log_price = cat_log_price[category] + 0.45 * quality + rng.normal(size=n) * 0.2
    price = np.exp(log_price).astype(np.float32)
    tier = np.where(quality < -0.6, "budget", np.where(quality > 0.6, "premium", "standard"))
    brand_ix = np.clip((quality * 2 + rng.normal(size=n)).round().astype(int) + 5, 0, 9)
    brand = np.array(
        [f"brand_{c % 8}_{b}" for c, b in zip(category, brand_ix, strict=True)], dtype=object
    )
    color = np.asarray(_COLORS, dtype=object)[rng.integers(0, len(_COLORS), size=n)]

    base = rng.lognormal(0.0, 1.4, size=n)
    launch = np.where(rng.random(n) < 0.8, 0.0, rng.uniform(0, cfg.days, size=n))
    trend = rng.normal(0, 1.0, size=n)
    n_periods = 8
    order = np.argsort(category, kind="stable")
    cat_start = np.searchsorted(category[order], np.arange(n_cat + 1))
    period_cum = np.zeros((n_periods, n), dtype=np.float64)
    period_cat_weight = np.zeros((n_periods, n_cat), dtype=np.float64)
    for p in range(n_periods):
        t = (p + 0.5) * cfg.days / n_periods
        age = t - launch
        novelty = 1.0 + 2.0 * np.exp(-np.maximum(age, 0) / 14.0)
        w = base * np.exp(trend * t / cfg.days) * novelty * (age >= 0)
        ws = w[order]
        for c in range(n_cat):
            a, b = cat_start[c], cat_start[c + 1]
            cs = np.cumsum(ws[a:b])
            period_cum[p, a:b] = cs
            period_cat_weight[p, c] = cs[-1] if b > a else 0.0
    ids = np.array([f"SKU-{i:07d}" for i in range(n)], dtype=object)
    return Catalog(
        item_ids=ids,
        category=category,
        category_names=names,
        price=price,
        brand=brand,
        color=color,
        tier=tier.astype(object),
        latent=latent.astype(np.float32),
        cat_latent=cat_latent.astype(np.float32),
        style=style.astype(np.float32),
        cat_log_price=cat_log_price,
        cat_weight=cat_weight,
        complements=[np.asarray(comp[c], dtype=np.int64) for c in range(n_cat)],
        order=order,
        cat_start=cat_start,
        period_cum=period_cum,
        period_cat_weight=period_cat_weight,
        n_periods=n_periods,
        days=cfg.days,
    )


class _BlockSimulator:
    """Simulates the users of one block with its own seeded generator."""

    def __init__(self, cfg: SyntheticConfig, cat: Catalog, block: int) -> None:
        self.cfg, self.cat = cfg, cat
        self.rng = np.random.default_rng([cfg.seed, 1, block])
        self.cols: dict[str, list] = {
            k: [] for k in ("user", "item", "ts", "event", "session", "surface")
        }

    def _period(self, day: float) -> int:
        return min(int(day / self.cat.days * self.cat.n_periods), self.cat.n_periods - 1)

    def _draw(self, c: int, period: int, taste: np.ndarray, pref: float, exclude: set[int]) -> int:
        """One item of category c: candidates by popularity, then a choice by taste and price."""
        cat, cfg, rng = self.cat, self.cfg, self.rng
        a, b = cat.cat_start[c], cat.cat_start[c + 1]
        total = cat.period_cum[period, b - 1] if b > a else 0.0
        if total <= 0:
            return -1
        u = rng.random(cfg.candidates) * total
        pos = a + np.searchsorted(cat.period_cum[period, a:b], u, side="right")
        cand = np.unique(cat.order[np.minimum(pos, b - 1)])
        if exclude:
            cand = cand[[int(x) not in exclude for x in cand]]
            if cand.size == 0:
                return -1
        score = cfg.taste_strength * (cat.latent[cand] @ taste)
        lp = np.log(cat.price[cand]) - cat.cat_log_price[c]
        score -= cfg.price_strength * (lp - pref) ** 2
        g = rng.gumbel(size=cand.size)
        return int(cand[np.argmax(score + g)])

    def user(self, u: int) -> int:
        """Simulate all sessions of user u; returns the user's country index."""
        cfg, cat, rng = self.cfg, self.cat, self.rng
        dim, n_cat = cfg.latent_dim, cfg.n_categories
        country = int(rng.choice(len(_COUNTRIES), p=_COUNTRY_P))
        favs = rng.choice(
            n_cat, size=rng.integers(1, 4), replace=False, p=cat.cat_weight / cat.cat_weight.sum()
        )
        styles = rng.integers(0, cat.style.shape[1], size=favs.size)
        taste = (cat.cat_latent[favs] + cat.style[favs, styles]).mean(0)
        taste += rng.normal(size=dim) * 0.3
        taste += 0.25 * _country_shift(cfg, country)
        taste /= np.linalg.norm(taste)
        pref = float(rng.normal(0, 0.45))  # preferred log price relative to the category
        cat_logit = cfg.category_strength * (cat.cat_latent @ taste)
        n_sessions = 1 + rng.poisson(max(cfg.sessions_per_user - 1, 0) * rng.gamma(2.0, 0.5))
        first = rng.uniform(0, cfg.days * 0.8)
        days = np.sort(rng.uniform(first, cfg.days, size=n_sessions))
        abandoned: list[int] = []
        for s, day in enumerate(days):
            session = u * 10_000 + s
            period = self._period(day)
            w = np.exp(cat_logit) * cat.period_cat_weight[period]
            p_cat = w / w.sum()
            ts = START_TS + int(day * DAY) + int(rng.integers(7 * 3600, 22 * 3600)) % DAY
            views: list[tuple[int, str]] = []
            seen: set[int] = set()
            if abandoned and rng.random() < 0.35:
                item = abandoned[int(rng.integers(len(abandoned)))]
                views.append((item, "email"))
                seen.add(item)
            n_views = 1 + rng.poisson(2.5)
            current = -1
            while len(views) < n_views:
                r = rng.random()
                comp = cat.complements[cat.category[current]] if current >= 0 else np.empty(0, int)
                if current >= 0 and comp.size and r < 0.3:
                    c, surface = int(comp[rng.integers(comp.size)]), "product"
                elif current >= 0 and r < 0.75:
                    c, surface = int(cat.category[current]), "product"
                else:
                    c = int(rng.choice(n_cat, p=p_cat))
                    surface = "home" if rng.random() < 0.7 else "search"
                item = self._draw(c, period, taste, pref, seen)
                if item < 0:
                    break
                views.append((item, surface))
                seen.add(item)
                current = item
            cart: list[int] = []
            for item, surface in views:
                ts += int(rng.integers(20, 240))
                self._emit(u, item, ts, "view", session, surface)
                fit = float(cat.latent[item] @ taste)
                lp = float(np.log(cat.price[item]) - cat.cat_log_price[cat.category[item]])
                logit = -1.6 + 3.0 * fit - cfg.price_strength * (lp - pref) ** 2
                if item in abandoned:
                    logit += 1.5
                if rng.random() < 1.0 / (1.0 + np.exp(-logit)):
                    ts += int(rng.integers(5, 60))
                    self._emit(u, item, ts, "cart", session, surface)
                    cart.append(item)
            if not cart:
                continue
            if rng.random() < 0.62:
                # Checkout add-on: a complement of something in the cart.
                anchor = cart[int(rng.integers(len(cart)))]
                comp = cat.complements[cat.category[anchor]]
                if comp.size and rng.random() < 0.45:
                    extra = self._draw(
                        int(comp[rng.integers(comp.size)]), period, taste, pref, set(cart)
                    )
                    if extra >= 0:
                        ts += int(rng.integers(5, 60))
                        self._emit(u, extra, ts, "cart", session, "checkout")
                        cart.append(extra)
                ts += int(rng.integers(30, 300))
                for item in cart:
                    self._emit(u, item, ts, "purchase", session, "checkout")
                abandoned = [a for a in abandoned if a not in cart]
            else:
                abandoned = (cart + abandoned)[:5]
        return country

    def _emit(self, u: int, item: int, ts: int, event: str, session: int, surface: str) -> None:
        c = self.cols
        c["user"].append(u)
        c["item"].append(item)
        c["ts"].append(ts)
        c["event"].append(event)
        c["session"].append(session)
        c["surface"].append(surface)

    def frame(self) -> pd.DataFrame:
        c = self.cols
        return pd.DataFrame(
            {
                "user_id": np.array([f"U{u:08d}" for u in c["user"]], dtype=object),
                "item_id": self.cat.item_ids[np.asarray(c["item"], dtype=np.int64)],
                "ts": np.asarray(c["ts"], dtype=np.int64),
                "event": np.asarray(c["event"], dtype=object),
                "session_id": np.asarray(c["session"], dtype=np.int64),
                "surface": np.asarray(c["surface"], dtype=object),
            }
        )


def _country_shift(cfg: SyntheticConfig, country: int) -> np.ndarray:
    v = np.random.default_rng([cfg.seed, 2, country]).normal(size=cfg.latent_dim)
    return v / np.linalg.norm(v)


def iter_blocks(
    cfg: SyntheticConfig, catalog: Catalog | None = None
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """(events, users) per block of BLOCK_USERS users, in user order."""
    cat = catalog if catalog is not None else build_catalog(cfg)
    n_blocks = (cfg.n_users + BLOCK_USERS - 1) // BLOCK_USERS
    for block in range(n_blocks):
        sim = _BlockSimulator(cfg, cat, block)
        countries = []
        first, last = block * BLOCK_USERS, min((block + 1) * BLOCK_USERS, cfg.n_users)
        for u in range(first, last):
            countries.append(sim.user(u))
        users = pd.DataFrame(
            {
                "user_id": np.array([f"U{u:08d}" for u in range(first, last)], dtype=object),
                "country": np.asarray(_COUNTRIES, dtype=object)[np.asarray(countries, dtype=int)],
            }
        )
        yield sim.frame(), users


def generate(cfg: SyntheticConfig) -> RetailData:
    """The whole data set in memory (for small and demo sizes)."""
    cat = build_catalog(cfg)
    events, users = [], []
    for ev, us in iter_blocks(cfg, cat):
        events.append(ev)
        users.append(us)
    return RetailData(
        name="synthetic",
        events=pd.concat(events, ignore_index=True),
        items=cat.items_frame(),
        users=pd.concat(users, ignore_index=True),
        target_events=("purchase",),
        meta={"generator": asdict(cfg)},
    )


def write_synthetic(cfg: SyntheticConfig, out_dir: str | Path) -> dict[str, int]:
    """Stream the data set to ``out_dir`` as items/users/events Parquet files.

    Events are written block by block (row groups), so memory stays at one block of
    users plus the catalog whatever the number of events. Returns row counts.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cat = build_catalog(cfg)
    cat.items_frame().to_parquet(out / "items.parquet", index=False)
    n_events = n_users = 0
    ev_writer: pq.ParquetWriter | None = None
    us_writer: pq.ParquetWriter | None = None
    try:
        for ev, us in iter_blocks(cfg, cat):
            ev_t = pa.Table.from_pandas(ev, preserve_index=False)
            us_t = pa.Table.from_pandas(us, preserve_index=False)
            if ev_writer is None:
                ev_writer = pq.ParquetWriter(out / "events.parquet", ev_t.schema)
                us_writer = pq.ParquetWriter(out / "users.parquet", us_t.schema)
            ev_writer.write_table(ev_t)
            assert us_writer is not None
            us_writer.write_table(us_t)
            n_events += len(ev)
            n_users += len(us)
    finally:
        if ev_writer is not None:
            ev_writer.close()
        if us_writer is not None:
            us_writer.close()
    (out / "generator.json").write_text(json.dumps(asdict(cfg), indent=2))
    return {"items": cfg.n_items, "users": n_users, "events": n_events}


def load_synthetic(path: str | Path) -> RetailData:
    """Read a data set written by :func:`write_synthetic`."""
    d = Path(path)
    meta = json.loads((d / "generator.json").read_text()) if (d / "generator.json").exists() else {}
    return RetailData(
        name="synthetic",
        events=pd.read_parquet(d / "events.parquet"),
        items=pd.read_parquet(d / "items.parquet"),
        users=pd.read_parquet(d / "users.parquet"),
        target_events=("purchase",),
        meta={"generator": meta, "path": str(d)},
    )
