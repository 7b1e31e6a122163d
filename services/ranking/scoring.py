"""How candidates get their model score before the business rules.

A :class:`Scorer` turns (profile, context, candidates, the candidates' rows of the
item table) into one score per
candidate, higher is better. The trained ranker (registered as ``mercato-ranker``) will
be a Scorer; until one is loaded the service ranks with :class:`RetrievalScorer`, the
candidates' own retrieval scores ("rules-only" mode, ``RankResponse.model`` empty).

A :class:`ScorerProvider` resolves a registry alias to the Scorer serving it, or None
when no model is loaded for it; the registry / hot-swap code plugs in there.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from mercato.v1 import common_pb2
from services.ranking.rules import CandidateSet
from services.ranking.table import CandidateArrays


@runtime_checkable
class Scorer(Protocol):
    """Scores candidates; one float per candidate, in the candidates' order."""

    @property
    def model_version(self) -> common_pb2.ModelVersion | None:
        """The registered model version behind the scores; None for rules-only."""
        ...

    def score(
        self,
        profile: common_pb2.Profile,
        context: common_pb2.Context,
        candidates: CandidateSet,
        items: CandidateArrays,
    ) -> np.ndarray:
        """Scores of ``candidates`` (shape ``[len(candidates)]``, finite)."""
        ...


class ScorerProvider(Protocol):
    """Resolves a registry alias ("" = the default alias) to a Scorer, or None."""

    def __call__(self, alias: str) -> Scorer | None: ...


class RetrievalScorer:
    """Rules-only mode: the candidates' retrieval scores are the model scores."""

    @property
    def model_version(self) -> common_pb2.ModelVersion | None:
        return None

    def score(
        self,
        profile: common_pb2.Profile,
        context: common_pb2.Context,
        candidates: CandidateSet,
        items: CandidateArrays,
    ) -> np.ndarray:
        return np.asarray(candidates.scores, dtype=np.float64).copy()


def no_ranker(alias: str) -> Scorer | None:
    """The provider in force until the trained ranker lands: no model for any alias."""
    return None
