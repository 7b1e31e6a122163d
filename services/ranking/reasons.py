"""Reasons that say why: each ranked item's reasons in words (``RankedItem.reason_texts``).

The rules pick the reason codes (the proposing source, a boost, buy-again); this module
names what put the item there, from what the request carries:

- ``REASON_SIMILAR``: "similar to your recent X", X the customer's item that points to
  the candidate most (retrieval's item-to-item anchor, ``Candidate.source_anchor_ids``);
- ``REASON_COMPLEMENT``: "bought with X" (the anchor retrieval names, else the item on
  screen, else the cart's first item);
- ``REASON_MODEL`` for a known customer: the item-to-item anchor when the history reaches
  the item ("similar to your recent X"), else "picked for you from your history";
- ``REASON_TRENDING`` / ``REASON_FALLBACK``: "popular in C" with the item's category,
  else "trending" / "popular right now";
- ``REASON_UPSELL``: "a step up from X" (the item on screen); ``REASON_BUY_AGAIN``:
  "you bought it before"; ``REASON_BOOSTED``: "promoted"; ``REASON_NEW_ITEM``: "new in C".

An unknown customer (``profile.known`` false) has no history a model could have read:
their ``REASON_MODEL`` becomes ``REASON_TRENDING`` ("popular in C"), so their items
never say "model".
"""

from __future__ import annotations

from mercato.v1 import common_pb2
from services.ranking.rules import CandidateSet

MODEL = int(common_pb2.REASON_MODEL)
SIMILAR = int(common_pb2.REASON_SIMILAR)
COMPLEMENT = int(common_pb2.REASON_COMPLEMENT)
TRENDING = int(common_pb2.REASON_TRENDING)
FALLBACK = int(common_pb2.REASON_FALLBACK)


def _anchor(candidates: CandidateSet, source: int, idx: int) -> str:
    anchors = candidates.source_anchors.get(source)
    return anchors[idx] if anchors is not None else ""


def _popular(category: str, default: str) -> str:
    return f"popular in {category}" if category else default


def explain(
    reasons: list[int],
    candidates: CandidateSet,
    idx: int,
    category: str,
    profile: common_pb2.Profile,
    context: common_pb2.Context,
) -> tuple[list[int], list[str]]:
    """The reason codes (an unknown customer's ``MODEL`` replaced) and their texts."""
    codes = list(reasons)
    if not profile.known and codes and codes[0] == MODEL:
        codes[0] = TRENDING
    similar_to = _anchor(candidates, SIMILAR, idx)
    cart = [line.item_id for line in profile.cart.lines] or list(context.cart_item_ids)
    texts = []
    for code in codes:
        if code == SIMILAR:
            texts.append(
                f"similar to your recent {similar_to}" if similar_to else "similar to this item"
            )
        elif code == COMPLEMENT:
            with_ = (
                _anchor(candidates, COMPLEMENT, idx)
                or context.anchor_item_id
                or (cart[0] if cart else "")
            )
            texts.append(f"bought with {with_}" if with_ else "often bought together")
        elif code == MODEL:
            texts.append(
                f"similar to your recent {similar_to}"
                if similar_to
                else "picked for you from your history"
            )
        elif code == TRENDING:
            texts.append(_popular(category, "trending"))
        elif code == FALLBACK:
            texts.append(_popular(category, "popular right now"))
        elif code == common_pb2.REASON_UPSELL:
            on_screen = context.anchor_item_id
            texts.append(f"a step up from {on_screen}" if on_screen else "a step up")
        elif code == common_pb2.REASON_BUY_AGAIN:
            texts.append("you bought it before")
        elif code == common_pb2.REASON_BOOSTED:
            texts.append("promoted")
        elif code == common_pb2.REASON_NEW_ITEM:
            texts.append(f"new in {category}" if category else "new")
        else:
            texts.append("")
    return codes, texts
