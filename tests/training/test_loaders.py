"""Loaders of real data formats: small slices written here, and the full shared files.

The shared copies live in ``../shared/data`` relative to the repository (CI has them);
the full-file tests skip only when that folder is absent, and say so.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.data import time_split, user_random_split
from training.loaders import load_movielens, load_online_retail

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"shared data folder {SHARED} is absent on this machine"
)

# Every quirk of the real file: a duplicate line, postage (POST, DOT), a manual line (M),
# bank charges, a line without customer, a cancellation (C...), a negative quantity, a
# zero price, a bad-debt adjustment (A...), a gift voucher.
RETAIL_CSV = """InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country
536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,2011-01-01 10:00:00,2.55,17850,United Kingdom
536365,71053,WHITE METAL LANTERN,6,2011-01-01 10:00:00,3.39,17850,United Kingdom
536365,71053,WHITE METAL LANTERN,6,2011-01-01 10:00:00,3.39,17850,United Kingdom
536365,POST,POSTAGE,1,2011-01-01 10:00:00,18.0,17850,United Kingdom
536366,22633,HAND WARMER UNION JACK,6,2011-01-02 10:01:00,1.85,13047,France
536366,85123A,WHITE HANGING HEART T-LIGHT HOLDER,2,2011-01-02 10:01:00,2.95,13047,France
536366,DOT,DOTCOM POSTAGE,1,2011-01-02 10:01:00,569.77,13047,France
536366,M,Manual,1,2011-01-02 10:01:00,0.85,13047,France
536367,BANK CHARGES,Bank Charges,1,2011-01-03 10:02:00,15.0,13047,France
536368,22633,HAND WARMER UNION JACK,3,2011-01-03 10:03:00,1.85,,United Kingdom
C536369,22633,HAND WARMER UNION JACK,-6,2011-01-04 10:04:00,1.85,13047,France
536370,21730,GLASS STAR FROSTED T-LIGHT HOLDER,-2,2011-01-04 10:05:00,4.25,12583,France
536371,21730,GLASS STAR FROSTED T-LIGHT HOLDER,1,2011-01-05 10:06:00,0.0,12583,France
A563185,B,Adjust bad debt,1,2011-01-05 10:07:00,-11062.06,,United Kingdom
536372,84029G,KNITTED UNION FLAG HOT WATER BOTTLE,6,2011-01-06 10:08:00,3.39,12583,France
536372,22752,SET 7 BABUSHKA NESTING BOXES,2,2011-01-06 10:08:00,7.65,12583,France
536373,gift_0001_10,Dotcomgiftshop Gift Voucher,1,2011-01-07 10:09:00,8.5,12583,France
"""


def test_online_retail_slice_drops_cancellations_customers_and_non_products(
    tmp_path: Path,
) -> None:
    f = tmp_path / "online_retail.csv.gz"
    pd.read_csv(io.StringIO(RETAIL_CSV), dtype=str).to_csv(f, index=False, compression="gzip")
    d = load_online_retail(tmp_path)  # a folder holding the file works, as does the file
    assert load_online_retail(f).events.equals(d.events)
    ev = d.events
    # Kept: 85123A x2, 71053 once (duplicate dropped), 22633 (13047), 84029G, 22752.
    assert sorted(zip(ev["session_id"], ev["item_id"], strict=True)) == [
        (536365, "71053"),
        (536365, "85123A"),
        (536366, "22633"),
        (536366, "85123A"),
        (536372, "22752"),
        (536372, "84029G"),
    ]
    assert set(ev["event"]) == {"purchase"} and d.target_events == ("purchase",)
    assert set(ev["user_id"]) == {"17850", "13047", "12583"}
    assert ev["ts"].is_monotonic_increasing or (ev["ts"] > 0).all()
    items = d.items.set_index("item_id")
    assert items.loc["85123A", "category"] == "holder"
    assert items.loc["22752", "category"] == "boxes"
    assert items.loc["84029G", "category"] == "bottle"
    assert items.loc["85123A", "price"] == pytest.approx((2.55 + 2.95) / 2)
    assert items.loc["71053", "attr_style"] == "white"
    users = d.users.set_index("user_id")
    assert users.loc["13047", "country"] == "France"
    s = time_split(d, 0.25, 0.25)
    assert len(s.train) + len(s.valid) + len(s.test) == len(ev)


def test_movielens_slice_random_order_and_genres(tmp_path: Path) -> None:
    r = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 2, 2, 2, 3],
            "item_id": [1, 2, 3, 4, 1, 3, 4, 2],
            "rating": [5, 3, 1, 4, 2, 5, 4, 3],
        }
    )
    r.to_csv(tmp_path / "ratings.csv.gz", index=False, compression="gzip")
    pd.DataFrame({"item_id": [1, 2, 3, 4], "movie_id": [1, 2, 3, None]}).to_csv(
        tmp_path / "item_map.csv", index=False
    )
    (tmp_path / "movies.dat").write_text(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure\n"
        "3::Grumpier Old Men (1995)::Comedy|Romance\n"
    )
    d = load_movielens(tmp_path)
    assert len(d.events) == 8 and (d.events["ts"] == 0).all()
    assert d.events["session_id"].nunique() == 8
    cats = d.items.set_index("item_id")["category"].to_dict()
    assert cats == {"1": "animation", "2": "adventure", "3": "comedy", "4": ""}
    high = load_movielens(tmp_path / "ratings.csv.gz", min_rating=4)
    assert len(high.events) == 4
    # The replay order is a seeded permutation (ratings files are sorted by item id).
    again = load_movielens(tmp_path)
    np.testing.assert_array_equal(d.events["session_id"], again.events["session_id"])
    other = load_movielens(tmp_path, seed=5)
    assert not np.array_equal(d.events["session_id"], other.events["session_id"])
    with pytest.raises(ValueError, match="no timestamps"):
        time_split(d)
    with pytest.raises(FileNotFoundError):
        load_movielens(tmp_path / "missing")


@needs_shared
@pytest.mark.slow
def test_full_online_retail_file() -> None:
    d = load_online_retail(SHARED / "online-retail")
    raw = pd.read_csv(
        SHARED / "online-retail" / "online_retail.csv.gz",
        dtype={"InvoiceNo": str, "StockCode": str, "CustomerID": "Int64"},
        usecols=["InvoiceNo", "StockCode", "CustomerID"],
    )
    assert len(raw) == 541_909
    ev = d.events
    # Rows dropped: ~25% without customer, cancellations, duplicates, non-products.
    assert 0.6 * len(raw) < len(ev) < 0.75 * len(raw)
    assert ev["user_id"].nunique() <= raw["CustomerID"].nunique()
    assert ev["user_id"].nunique() > 4000
    assert ev["item_id"].str.match(r"^\d{5}").all()
    assert not ev["item_id"].isin(["POST", "DOT", "M", "BANK CHARGES", "AMAZONFEE"]).any()
    cancelled = set(raw.loc[raw["InvoiceNo"].str.startswith("C"), "InvoiceNo"])
    assert not set(ev["session_id"].astype(str)) & cancelled
    assert not ev.duplicated(["session_id", "item_id"]).any()
    assert (d.items["price"] > 0).all()
    assert (d.items["category"] != "").mean() > 0.99
    assert d.items["category"].nunique() > 100
    s = time_split(d)
    assert s.train["ts"].max() <= s.test["ts"].min()
    assert len(s.test) > 0.05 * len(ev)


@needs_shared
@pytest.mark.slow
def test_full_movielens_file() -> None:
    d = load_movielens(SHARED / "ml-1m")
    summary = d.summary()
    assert (summary["events"], summary["users"], summary["items"]) == (1_000_209, 6040, 3706)
    assert (d.items["category"] != "").mean() > 0.95
    s = user_random_split(d, 0.1, 0.1, seed=0)
    assert len(s.train) + len(s.valid) + len(s.test) == summary["events"]
    per_user = s.test.groupby("user_id").size() / d.events.groupby("user_id").size()
    assert per_user.dropna().between(0.05, 0.11).all()
