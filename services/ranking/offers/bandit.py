"""Bayesian logistic conversion model with a shared base and a lift per offer.

For context features ``x`` (length ``d``) and offer ``a``::

    P(convert | a, x) = sigmoid(x . (w_base + w_lift[a])),   w_lift[none] = 0

The weights ``w = [w_base, w_lift[1], ..., w_lift[A-1]]`` have one joint Gaussian
posterior N(mean, cov) (Laplace approximation). The prior of every lift block is centred
on zero, "the offer changes nothing", so an offer has to earn its cost with evidence,
and the base block learns the no-offer conversion rate from every decision, including
those that gave an offer. The joint covariance keeps what a diagonal one would lose:
an observation under offer ``a`` pins down ``w_base + w_lift[a]`` much better than
either part, and only the joint posterior knows that.

Updates are online Laplace steps, one observation at a time (as in Chapelle & Li,
2011): with prior N(m, S) and the observation's design vector ``phi`` (``x`` in the
base block and in the offer's lift block), the posterior mode is ``m + t * S phi`` where
the scalar ``t`` solves ``t = y - sigmoid(m.phi + t * phi' S phi)`` (bracketed Newton),
and ``S`` gets the rank-one update of the Hessian ``p (1 - p) phi phi'`` at the mode.

Thompson sampling only needs the arms' logits for the ``x`` at hand, which are jointly
Gaussian with mean ``Phi m`` and covariance ``Phi S Phi'`` (``A x A``), so a decision
costs one small Cholesky, not a factorisation of ``S``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PRIOR_BIAS_MEAN = -2.0  # about 12 % conversion before any data
PRIOR_BIAS_SD = 2.0
PRIOR_BASE_SD = 1.0
_SYMMETRIZE_EVERY = 64


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


@dataclass(frozen=True)
class ModelSnapshot:
    """A stored posterior; ``seq`` is the last settled decision it includes."""

    arms: tuple[str, ...]
    features: str  # signature of the feature set
    mean: np.ndarray
    cov: np.ndarray
    updates: int
    seq: int


class LiftModel:
    """Conversion model over ``arms``; ``arms[0]`` is "no offer" (no lift block)."""

    def __init__(
        self,
        arms: Sequence[str],
        dim: int,
        prior_lift_sd: float = 0.5,
        bias_index: int = 0,
    ) -> None:
        self.arms = list(arms)
        self.dim = dim
        self.prior_lift_sd = prior_lift_sd
        self.bias_index = bias_index
        self.updates = 0
        mean, var = self._prior_blocks()
        self.mean = np.concatenate(mean)
        self.cov = np.diag(np.concatenate(var))

    @property
    def size(self) -> int:
        return self.dim * len(self.arms)

    def _prior_blocks(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        base_mean = np.zeros(self.dim)
        base_mean[self.bias_index] = PRIOR_BIAS_MEAN
        base_var = np.full(self.dim, PRIOR_BASE_SD**2)
        base_var[self.bias_index] = PRIOR_BIAS_SD**2
        lift_var = np.full(self.dim, self.prior_lift_sd**2)
        means = [base_mean] + [np.zeros(self.dim) for _ in self.arms[1:]]
        return means, [base_var] + [lift_var.copy() for _ in self.arms[1:]]

    # -------------------------------------------------------------- persistence

    def snapshot(self, features: str, seq: int) -> ModelSnapshot:
        return ModelSnapshot(
            tuple(self.arms), features, self.mean.copy(), self.cov.copy(), self.updates, seq
        )

    def restore(self, snap: ModelSnapshot) -> bool:
        """Take a stored posterior. Offers present in both keep their blocks (and their
        covariance with the others); new offers start from the prior; removed ones are
        dropped. False (model unchanged) when the snapshot does not fit."""
        if snap.mean.shape != (len(snap.arms) * self.dim,) or snap.arms[:1] != tuple(self.arms[:1]):
            return False
        source = [snap.arms.index(a) if a in snap.arms else -1 for a in self.arms]
        d = self.dim
        prior_mean, prior_var = self._prior_blocks()
        mean = np.concatenate(prior_mean)
        cov = np.diag(np.concatenate(prior_var))
        for i, si in enumerate(source):
            if si < 0:
                continue
            mean[i * d : (i + 1) * d] = snap.mean[si * d : (si + 1) * d]
            for j, sj in enumerate(source):
                if sj >= 0:
                    cov[i * d : (i + 1) * d, j * d : (j + 1) * d] = snap.cov[
                        si * d : (si + 1) * d, sj * d : (sj + 1) * d
                    ]
        self.mean, self.cov, self.updates = mean, cov, snap.updates
        return True

    # -------------------------------------------------------------- inference

    def _arm_gaussian(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean [A] and covariance [A, A] of the arms' logits at ``x``.

        Arm a's logit is ``x.w_base + x.w_lift[a]``: with the block-level projections
        ``z_k = x.w_k`` (mean ``M x``, covariance ``B``), the logits are ``T z`` with
        ``T[a, 0] = 1`` and ``T[a, a] = 1`` for a > 0.
        """
        n, d = len(self.arms), self.dim
        z_mean = self.mean.reshape(n, d) @ x
        cov_x = self.cov.reshape(n, d, n, d) @ x  # [n, d, n]
        b = np.einsum("aib,i->ab", cov_x, x)
        mu = z_mean + z_mean[0]
        mu[0] = z_mean[0]
        c = b + b[0:1, :] + b[:, 0:1] + b[0, 0]
        c[0, :] = b[0, :] + b[0, 0]
        c[:, 0] = b[:, 0] + b[0, 0]
        c[0, 0] = b[0, 0]
        return mu, c

    def logits(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Per-arm logits: posterior means, or one joint Thompson sample with ``rng``."""
        mu, c = self._arm_gaussian(x)
        if rng is None:
            return mu
        c = 0.5 * (c + c.T) + 1e-10 * np.eye(len(mu))
        try:
            chol = np.linalg.cholesky(c)
        except np.linalg.LinAlgError:
            w, v = np.linalg.eigh(c)
            chol = v * np.sqrt(np.clip(w, 0.0, None))
        return mu + chol @ rng.standard_normal(len(mu))

    def predictive(self, x: np.ndarray) -> np.ndarray:
        """Posterior-predictive P(convert | arm, x): the logistic averaged over the
        posterior (probit approximation, MacKay 1992)."""
        mu, c = self._arm_gaussian(x)
        var = np.clip(np.diag(c), 0.0, None)
        return sigmoid(mu / np.sqrt(1.0 + np.pi * var / 8.0))

    def probabilities(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """P(convert | arm, x) for every arm (means, or a Thompson sample)."""
        return sigmoid(self.logits(x, rng))

    def update(self, arm: str, x: np.ndarray, converted: bool) -> None:
        """Condition on one observation of ``arm`` at ``x``."""
        a = self.arms.index(arm)
        phi = np.zeros(self.size)
        phi[: self.dim] = x
        if a:
            phi[a * self.dim : (a + 1) * self.dim] = x
        y = 1.0 if converted else 0.0
        s_phi = self.cov @ phi
        v = float(phi @ s_phi)
        mu = float(self.mean @ phi)
        lo, hi = y - 1.0, y
        t = 0.5 * (lo + hi)
        for _ in range(60):
            p = float(sigmoid(mu + t * v))
            g = t - y + p
            if g > 0:
                hi = t
            else:
                lo = t
            t_new = t - g / (1.0 + p * (1.0 - p) * v)
            if not lo <= t_new <= hi:
                t_new = 0.5 * (lo + hi)
            if abs(t_new - t) < 1e-12:
                t = t_new
                break
            t = t_new
        self.mean = self.mean + t * s_phi
        p = float(sigmoid(self.mean @ phi))
        h = p * (1.0 - p)
        self.cov -= np.outer(s_phi, s_phi) * (h / (1.0 + h * v))
        self.updates += 1
        if self.updates % _SYMMETRIZE_EVERY == 0:
            self.cov = 0.5 * (self.cov + self.cov.T)
