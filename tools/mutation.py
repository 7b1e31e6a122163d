"""Mutation testing of the modules whose correctness matters most (``make mutation``).

One mutmut run per module, each in its own scratch copy of the repository under
``.mutation/<module>/`` (mutmut writes its ``mutants/`` tree next to the
``pyproject.toml`` it reads, so a copy keeps the work tree clean and lets modules use
different test selections). Each run mutates only the module's files, restricted to the
functions named in :data:`MODULES`, and runs only that module's fast unit tests (no
service processes, no training), niced, so a module fits a 2-core machine.

The score of a module is killed / (killed + survived + no tests + timeout... see
:func:`score`): every mutant that no test notices counts against it. The table goes to
``docs/testing.md`` (with the surviving mutants' names, each a missing test) and the
numbers to ``bench/results/mutation.json``.

    .venv/bin/python -m tools.mutation                 # every module, one after the other
    .venv/bin/python -m tools.mutation offer-policy    # one module
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / ".mutation"
RESULTS = REPO / "bench" / "results" / "mutation.json"
DOC = REPO / "docs" / "testing.md"

# What a scratch copy holds: the packages (all importable from mutmut's copy), the tests
# and the files they read.
COPY = ("mercato", "services", "training", "tests", "config", "pyproject.toml")


@dataclass(frozen=True)
class Module:
    """One mutation target: files, the functions mutated in them, the tests run."""

    what: str
    files: tuple[str, ...]
    functions: tuple[str, ...]  # mutant-name globs (mutmut's names: module.xǁClassǁmethod)
    tests: tuple[str, ...]


MODULES: dict[str, Module] = {
    "profile-store": Module(
        "profile stores: batch planning, batch write (SQLite group commit, Redis MULTI), "
        "idempotency by event id",
        (
            "services/profile/store/base.py",
            "services/profile/store/sqlite.py",
            "services/profile/store/redis.py",
        ),
        (
            "services.profile.store.base.x_plan_batch__mutmut_*",
            "services.profile.store.sqlite.xǁ_Writerǁ*",
            "services.profile.store.sqlite.xǁSqliteStoreǁappend_events__mutmut_*",
            "services.profile.store.redis.xǁRedisStoreǁappend_events__mutmut_*",
        ),
        ("tests/profile/test_store.py",),
    ),
    "profile-recompute": Module(
        "profile recompute: the derived state and trending rebuilt from the log",
        ("services/profile/logic.py",),
        (
            "services.profile.logic.x_recompute_profile__mutmut_*",
            "services.profile.logic.x_recompute_trending__mutmut_*",
            "services.profile.logic.x_apply_event__mutmut_*",
        ),
        ("tests/profile/test_store.py", "tests/profile/test_logic.py"),
    ),
    "model-watcher": Module(
        "model watcher: resolve alias, download, validate, refuse or swap",
        ("services/models/watcher.py",),
        (
            "services.models.watcher.xǁModelWatcherǁ_check_alias__mutmut_*",
            "services.models.watcher.xǁModelWatcherǁ_download_and_load__mutmut_*",
            "services.models.watcher.xǁModelWatcherǁ_refuse__mutmut_*",
            "services.models.watcher.xǁModelWatcherǁ_publish__mutmut_*",
        ),
        ("tests/models/test_watcher.py",),
    ),
    "gateway-breaker": Module(
        "gateway: circuit breaker, per-hop deadlines and retries",
        ("services/gateway/breaker.py", "services/gateway/downstream.py"),
        ("services.gateway.breaker.*", "services.gateway.downstream.*"),
        ("tests/gateway/test_breaker.py", "tests/gateway/test_downstream.py"),
    ),
    "gateway-fallbacks": Module(
        "gateway: what a failed or slow profile, retrieval, ranking, item lookup or offer "
        "hop turns into (anonymous profile, popular items, retrieval order, ids only, no "
        "offer), the degraded entries and the shortfall",
        ("services/gateway/pipeline.py",),
        tuple(
            f"services.gateway.pipeline.{name}__mutmut_*"
            for name in (
                "xǁTraceǁdrop",
                "xǁTraceǁdegrade",
                "xǁTraceǁshortfall",
                "xǁPipelineǁget_profile",
                "xǁPipelineǁtrending",
                "xǁPipelineǁ_trending",
                "xǁPipelineǁ_trending_call",
                "xǁPipelineǁ_trending_depth",
                "xǁPipelineǁitem_details",
                "xǁPipelineǁselect_offer",
                "xǁPipelineǁrank",
                "xǁPipelineǁcandidates",
                "xǁPipelineǁ_fallback_trending",
                "xǁPipelineǁoverloaded_recommend",
                "x__complement_fallback",
                "x__passthrough",
            )
        ),
        ("tests/gateway/test_fallbacks.py",),
    ),
    "offer-policy": Module(
        "offer policy: budget reservation, spending and release",
        ("services/ranking/offers/policy.py",),
        (
            "services.ranking.offers.policy.xǁOfferPolicyǁ_remaining__mutmut_*",
            "services.ranking.offers.policy.xǁOfferPolicyǁselect__mutmut_*",
            "services.ranking.offers.policy.xǁOfferPolicyǁ_settle__mutmut_*",
            "services.ranking.offers.policy.xǁOfferPolicyǁstatus__mutmut_*",
        ),
        ("tests/ranking/test_offers.py", "tests/ranking/test_offers_shared.py"),
    ),
    "evaluation-metrics": Module(
        "evaluation metrics: top-k with exclusions, recall/NDCG/MAP/coverage, re-rank NDCG",
        ("training/evaluate.py", "training/ranker.py"),
        (
            "training.evaluate.x_top_k__mutmut_*",
            "training.evaluate.x_metrics_from_ranking__mutmut_*",
            "training.ranker.x_rerank_metrics__mutmut_*",
            "training.ranker.x_graded_ndcg__mutmut_*",
        ),
        (
            "tests/training/test_training.py",
            "tests/training/test_baselines.py",
            "tests/ranking/test_ranker.py",
        ),
    ),
}

KILLED = {"killed", "timeout", "caught by type check", "segfault"}

_EV = "training.evaluate.x_"
_RK = "training.ranker.x_"
_UPPER = "numpy reads the sort kind case-insensitively: 'STABLE' is 'stable'"
_AXIS = "axis=-1 is the default and the arrays are 2-D"
_TIES = "only reorders tied scores among the k kept, whose order argpartition leaves undefined"
_GW = "services.gateway.pipeline.xǁPipelineǁ"
_UNUSED = "trending() does not read its profile argument (popular items are the same for all)"
# Mutants no test can tell from the original (beyond SQL re-casing, found automatically),
# each with the reason; listed in docs/testing.md and not counted in the score.
EQUIVALENT: dict[str, str] = {
    f"{_EV}metrics_from_ranking__mutmut_21": "2.0 / log2 instead of 1.0 / log2: a constant "
    "factor of both DCG and IDCG, cancelled in their ratio",
    f"{_EV}metrics_from_ranking__mutmut_30": "one more discount computed, never read (the "
    "ranking is at least max(ks) wide, as documented)",
    f"{_EV}metrics_from_ranking__mutmut_6": "hits as float zeros instead of bool: the same "
    "sums, products and comparisons",
    f"{_EV}metrics_from_ranking__mutmut_8": "hits as float zeros instead of bool: the same "
    "sums, products and comparisons",
    f"{_EV}metrics_from_ranking__mutmut_62": "n_true >= 0: a user without truth has DCG 0, "
    "so DCG / IDCG is 0 either way",
    f"{_EV}metrics_from_ranking__mutmut_67": "astype(None) is float64, the original dtype",
    f"{_EV}top_k__mutmut_7": "copy=True is np.array's default",
    f"{_EV}top_k__mutmut_10": "excluded scores set to NaN instead of -inf: NaN also sorts "
    "after every number, so excluded items still come last",
    f"{_EV}top_k__mutmut_24": _AXIS,
    f"{_EV}top_k__mutmut_34": _AXIS,
    f"{_EV}top_k__mutmut_42": _AXIS,
    f"{_EV}top_k__mutmut_52": _AXIS,
    f"{_EV}top_k__mutmut_32": _TIES,
    f"{_EV}top_k__mutmut_35": _TIES,
    f"{_EV}top_k__mutmut_46": "numpy reads the sort kind case-insensitively: 'STABLE' is 'stable'",
    f"{_RK}graded_ndcg__mutmut_14": _AXIS,
    f"{_RK}graded_ndcg__mutmut_26": _AXIS,
    f"{_RK}graded_ndcg__mutmut_56": _AXIS,
    f"{_RK}graded_ndcg__mutmut_19": _UPPER,
    f"{_RK}graded_ndcg__mutmut_37": "2.0 / log2 instead of 1.0 / log2: a constant factor "
    "of both DCG and IDCG, cancelled in their ratio",
    f"{_RK}rerank_metrics__mutmut_21": _AXIS,
    f"{_RK}rerank_metrics__mutmut_33": _AXIS,
    f"{_RK}rerank_metrics__mutmut_26": _UPPER,
    f"{_RK}rerank_metrics__mutmut_38": "<= instead of <: padding by zero columns is a no-op",
    f"{_RK}rerank_metrics__mutmut_49": "more padding columns than needed, beyond max(ks), "
    "never read",
    f"{_RK}rerank_metrics__mutmut_52": "padding marked -2 instead of -1: negative either "
    "way, never an item of the truth",
    "services.models.watcher.xǁModelWatcherǁ_download_and_load__mutmut_11": "remember=None "
    "instead of False: both falsy, the only use is `if remember:`",
    **{
        f"services.models.watcher.xǁModelWatcherǁ_publish__mutmut_{i}": "the re-aliasing "
        "in _publish never runs: both callers pass a version resolved under that alias"
        for i in range(1, 11)
    },
    "services.models.watcher.xǁModelWatcherǁ_refuse__mutmut_9": "the reason remembered "
    "for a refused version is never read, only whether the version was refused",
    **{f"{_GW}_fallback_trending__mutmut_2": _UNUSED, f"{_GW}candidates__mutmut_88": _UNUSED},
    **{
        f"{_GW}{fn}__mutmut_{i}": "a hop timeout of ms / 1001 instead of ms / 1000 s: 0.1% "
        "shorter, which no test can time"
        for fn, i in (
            ("_trending_call", 17),
            ("candidates", 71),
            ("get_profile", 22),
            ("item_details", 37),
            ("rank", 48),
            ("select_offer", 22),
        )
    },
    **{
        f"{_GW}{fn}__mutmut_{i}": "None (or nothing) for a protobuf scalar field in the "
        "constructor leaves it at its default, the 0 or False written"
        for fn, i in (
            ("candidates", 134),
            ("get_profile", 35),
            ("rank", 75),
            ("select_offer", 36),
            ("get_profile", 2),
            ("get_profile", 48),
            ("get_profile", 50),
        )
    },
    **{
        f"{_GW}overloaded_recommend__mutmut_{i}": "the trace's debug flag: the overload "
        "answer records no stages and builds no debug info"
        for i in (23, 24)
    },
    f"{_GW}select_offer__mutmut_14": "retries omitted: Downstream.call's default is the 0 written",
    **{
        f"services.ranking.offers.policy.xǁOfferPolicyǁ_settle__mutmut_{i}": "an offer's "
        "counters exist from its first decision (written with it, restored with the state), "
        "so the default of counts.setdefault is never used when an outcome is settled"
        for i in (61, 63)
    },
    **{
        f"services.profile.logic.x_apply_event__mutmut_{i}": "INTEREST_WEIGHTS.get(kind) "
        "without a default gives None for the other kinds, as falsy as the 0.0 written"
        for i in (29, 31)
    },
}


def _copy_repo(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *COPY],
        cwd=REPO,
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _toml_list(values: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _configure(dst: Path, mod: Module) -> None:
    """Append mutmut's settings for ``mod`` to the copy's pyproject.toml."""
    cfg = dst / "pyproject.toml"
    text = cfg.read_text()
    text += (
        "\n[tool.mutmut]\n"
        'source_paths = ["mercato", "services", "training"]\n'
        f"only_mutate = {_toml_list(mod.files)}\n"
        'also_copy = ["config"]\n'  # files the code reads next to the packages
        # the copy is what must be imported: no pythonpath from the pytest config
        'pytest_add_cli_args = ["-o", "pythonpath=", "-p", "no:cacheprovider", "-q", '
        '"-m", "not slow", "-x"]\n'
        f"pytest_add_cli_args_test_selection = {_toml_list(mod.tests)}\n"
        'process_isolation = "forkserver"\n'
        "use_git_change_detection = false\n"
    )
    cfg.write_text(text)


def _functions(source: str) -> dict[str, list[str]]:
    """Every function of a mutmut-generated file by name, as source lines."""
    import ast

    lines = source.splitlines()
    out: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno:
            out[node.name] = lines[node.lineno : node.end_lineno]  # body, not the def line
    return out


def _is_equivalent(mutant: list[str], orig: list[str]) -> bool:
    """An SQL statement only re-cased (SQL keywords are case-insensitive): no test can
    tell it from the original, so it is not counted."""
    changed = [(a, b) for a, b in zip(orig, mutant, strict=False) if a != b]
    return (
        len(orig) == len(mutant)
        and len(changed) == 1
        and changed[0][0].lower() == changed[0][1].lower()
        and bool(_SQL.search(changed[0][0]))
    )


_SQL = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|VALUES|CONFLICT|SAVEPOINT|RELEASE|COMMIT|BEGIN|"
    r"ROLLBACK|WHERE|excluded)\b"
)


def _statuses(dst: Path, mod: Module) -> dict[str, str]:
    sys.path.insert(0, str(dst))  # mutmut's status table only
    from mutmut.stats import status_by_exit_code

    out: dict[str, str] = {}
    for rel in mod.files:
        meta = dst / "mutants" / (rel + ".meta")
        if not meta.exists():
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        functions = _functions((dst / "mutants" / rel).read_text())
        for name, code in codes.items():
            if any(fnmatch.fnmatchcase(name, pat) for pat in mod.functions):
                fn = name.rsplit(".", 1)[1]
                orig = functions.get(fn.rsplit("__mutmut_", 1)[0] + "__mutmut_orig", [])
                if name in EQUIVALENT or _is_equivalent(functions.get(fn, []), orig):
                    out[name] = "equivalent"
                else:
                    out[name] = status_by_exit_code[code]
    return out


def score(statuses: dict[str, str]) -> dict[str, Any]:
    """Counts per status and the share of mutants killed (timeouts count as killed:
    the mutant made the code hang, which a test noticed)."""
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    total = sum(n for s, n in counts.items() if s != "equivalent")
    killed = sum(n for s, n in counts.items() if s in KILLED)
    return {
        "mutants": total,
        "killed": killed,
        "equivalent": counts.get("equivalent", 0),
        "score": round(killed / total, 4) if total else None,
        "by_status": dict(sorted(counts.items())),
        "survivors": sorted(n for n, s in statuses.items() if s not in KILLED | {"equivalent"}),
    }


def rescore(name: str, previous: dict[str, Any] | None) -> dict[str, Any]:
    """Score an existing run again (after a change to the scoring, not to code or tests).
    Without a previous record, the run time is read from the scratch copy's files (from
    writing its config to mutmut's log)."""
    mod = MODULES[name]
    dst = SCRATCH / name
    result = score(_statuses(dst, mod))
    if previous is None:
        seconds = (dst / "mutmut.log").stat().st_mtime - (dst / "pyproject.toml").stat().st_mtime
        previous = {
            "what": mod.what,
            "files": list(mod.files),
            "functions": list(mod.functions),
            "tests": list(mod.tests),
            "seconds": round(seconds, 1),
        }
    return {**previous, **result}


def run_module(name: str, max_children: int) -> dict[str, Any]:
    mod = MODULES[name]
    dst = SCRATCH / name
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    _copy_repo(dst)
    _configure(dst, mod)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    cmd = ["nice", "-n", "10", mutmut, "run", "--max-children", str(max_children)]
    t0 = time.monotonic()
    proc = subprocess.run([*cmd, *mod.functions], cwd=dst, env=env, text=True, capture_output=True)
    seconds = time.monotonic() - t0
    (dst / "mutmut.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"mutmut failed for {name} (see {dst / 'mutmut.log'}):\n{proc.stderr}")
    result = score(_statuses(dst, mod))
    result.update(
        what=mod.what,
        files=list(mod.files),
        functions=list(mod.functions),
        tests=list(mod.tests),
        seconds=round(seconds, 1),
    )
    return result


def write_report(results: dict[str, dict[str, Any]]) -> None:
    """Write ``results`` to bench/results/mutation.json and their rows into the table of
    docs/testing.md; the rows of modules not in ``results`` (run elsewhere: the JSON file
    is local) are kept as they are."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    text = DOC.read_text() if DOC.exists() else ""
    start, end = "<!-- mutation-table -->", "<!-- /mutation-table -->"
    rows: dict[str, str] = {}
    if start in text and end in text:
        for line in text.split(start, 1)[1].split(end, 1)[0].splitlines():
            name = line.split("|")[1].strip() if line.startswith("| ") else ""
            if name in MODULES:
                rows[name] = line
    for name, r in results.items():
        pct = f"{100 * r['score']:.1f}%" if r["score"] is not None else "n/a"
        tests = ", ".join(f"`{t}`" for t in r["tests"])
        rows[name] = (
            f"| {name} | {r['mutants']} | {r['killed']} | {pct} | {r.get('equivalent', 0)} "
            f"| {r['seconds']:.0f} s | {tests} |"
        )
    table = "\n".join(
        [
            "| module | mutants | killed | score | equivalent (not counted) | run time | tests |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
            *(rows[name] for name in MODULES if name in rows),
        ]
    )
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        DOC.write_text(f"{head}{start}\n{table}\n{end}{tail}")
    print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--rescore", action="store_true", help="score the last runs again")
    args = parser.parse_args(argv)
    names = args.modules or list(MODULES)
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        parser.error(f"unknown modules {unknown}; known: {', '.join(MODULES)}")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in names:
        print(f"== {name}", flush=True)
        if args.rescore:
            results[name] = rescore(name, results.get(name))
        else:
            results[name] = run_module(name, args.max_children)
        r = results[name]
        # Re-read before writing: another module may have been run in parallel meanwhile.
        on_disk = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results = {**on_disk, name: r}
        print(
            f"   {r['killed']}/{r['mutants']} killed ({r['score']}), {r['seconds']} s; "
            f"survivors: {len(r['survivors'])}",
            flush=True,
        )
        write_report({k: results[k] for k in MODULES if k in results})


if __name__ == "__main__":
    main()
