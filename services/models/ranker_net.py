"""The ranker network in torch: what training trains and what tests compare the serving
copy with.

Serving never imports this module: :class:`services.models.ranker.RankerBundle` holds the
weights as NumPy arrays (``ranker.npz``) and scores with
:class:`services.models.ranker.NumpyRanker`; :attr:`RankerBundle.net` rebuilds this
module from the arrays when training code or a test asks for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from services.models.ranker import FEATURES


class RankerNet(nn.Module):
    """Wide & deep scorer over standardised features: ``wide(z) + mlp(z)``.

    With ``start_from`` (a feature name, "-name" for its negative) the wide part starts
    as that feature alone and the MLP's output layer starts at zero, so the untrained
    model ranks exactly by that feature (training starts from the retrieval order, not
    from noise). ``features`` names the input columns (default: all of FEATURES)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        n_features: int,
        hidden: Sequence[int] = (64, 32),
        dropout: float = 0.0,
        start_from: str | None = None,
        features: Sequence[str] | None = None,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        d = n_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        out = nn.Linear(d, 1)
        layers.append(out)
        self.mlp = nn.Sequential(*layers)
        self.wide = nn.Linear(n_features, 1)
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        if start_from is not None:
            with torch.no_grad():
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)
                nn.init.zeros_(self.wide.weight)
                nn.init.zeros_(self.wide.bias)
                sign = -1.0 if start_from.startswith("-") else 1.0
                names = list(features) if features is not None else list(FEATURES)
                self.wide.weight[0, names.index(start_from.lstrip("-"))] = sign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., F] raw features -> scores [...]."""
        z = (x - self.mean) / self.std
        return (self.mlp(z) + self.wide(z)).squeeze(-1)


def net_weights(net: nn.Module) -> dict[str, np.ndarray]:
    """A network's state dict as float32 NumPy arrays."""
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in net.state_dict().items()}


def net_from_weights(weights: Mapping[str, np.ndarray], hidden: Sequence[int]) -> RankerNet:
    """A :class:`RankerNet` (eval mode) holding ``weights`` (state dict as arrays, with
    ``mean`` and ``std``)."""
    net = RankerNet(len(weights["mean"]), hidden=hidden)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True)
    return net.eval()
