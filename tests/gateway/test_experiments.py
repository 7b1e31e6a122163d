"""A/B assignment: stable per customer and split as configured (no processes)."""

from __future__ import annotations

from services.gateway.experiments import Experiment, Variant


def test_ab_assignment_is_stable_and_split_as_configured() -> None:
    exp = Experiment(
        "tt",
        "retrieval",
        (Variant("control", "champion", 90), Variant("challenger", "challenger", 10)),
    )
    first = [exp.assign(f"c{i}").name for i in range(20_000)]
    assert first == [exp.assign(f"c{i}").name for i in range(20_000)]
    share = first.count("challenger") / len(first)
    assert 0.09 < share < 0.11
