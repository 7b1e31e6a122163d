"""The two-tower network in torch: what training trains and what tests compare the
serving copy with.

Serving never imports this module: :class:`services.models.two_tower.TwoTowerBundle`
holds the towers' weights as NumPy arrays (``towers.npz``) and computes both towers in
NumPy. Training builds a :class:`TwoTowerNet`, trains it, and hands it to the bundle,
which copies its state dict out as arrays; :meth:`TwoTowerBundle.net` rebuilds the torch
module from those arrays when training code or a test asks for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from mercato.features import PRICE_BANDS


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


def net_from_weights(
    config: dict[str, Any], vocab: dict[str, list[str]], weights: Mapping[str, np.ndarray]
) -> TwoTowerNet:
    """A :class:`TwoTowerNet` (eval mode) holding ``weights`` (a state dict as arrays)."""
    net = build_net(config, vocab)
    state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
    net.load_state_dict(state, strict=True)
    return net.eval()


def net_weights(net: nn.Module) -> dict[str, np.ndarray]:
    """A network's state dict as NumPy arrays (float32; integer buffers as int64)."""
    out: dict[str, np.ndarray] = {}
    for k, v in net.state_dict().items():
        a = v.detach().cpu().numpy()
        out[k] = a.astype(np.float32 if a.dtype.kind == "f" else np.int64)
    return out
