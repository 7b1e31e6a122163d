"""A/B experiments: variants name model aliases; customers are assigned by a stable hash
of (experiment, customer), so the same customer always sees the same variant and the
split follows the configured weights.

Experiments file (YAML or JSON)::

    experiments:
      - name: two-tower-challenger
        stage: retrieval          # which model the variants choose: retrieval | ranking
        variants:
          - {name: control, alias: champion, weight: 90}
          - {name: challenger, alias: challenger, weight: 10}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Variant:
    name: str
    alias: str
    weight: float


@dataclass(frozen=True)
class Experiment:
    name: str
    stage: str
    variants: tuple[Variant, ...]

    def assign(self, customer_id: str) -> Variant:
        """The variant of ``customer_id``: stable, split by weight."""
        digest = hashlib.sha256(f"{self.name}:{customer_id}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64
        total = sum(v.weight for v in self.variants)
        acc = 0.0
        for v in self.variants:
            acc += v.weight / total
            if point < acc:
                return v
        return self.variants[-1]


def load_experiments(path: str | Path | None) -> list[Experiment]:
    """Experiments from a config file (empty list when no file is given)."""
    if not path:
        return []
    text = Path(path).read_text()
    data: Any = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    result = []
    for e in (data or {}).get("experiments", []):
        variants = tuple(
            Variant(str(v["name"]), str(v.get("alias", "champion")), float(v.get("weight", 1)))
            for v in e.get("variants", [])
        )
        stage = str(e.get("stage", "retrieval"))
        if (
            not variants
            or any(v.weight < 0 for v in variants)
            or stage
            not in {
                "retrieval",
                "ranking",
            }
        ):
            raise ValueError(f"experiment {e.get('name')!r}: needs variants and a valid stage")
        result.append(Experiment(str(e["name"]), stage, variants))
    return result
