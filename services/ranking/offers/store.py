"""Where the offer policy keeps its state: posteriors, budgets, counters, decisions.

Two interchangeable backends behind :class:`OfferStore`: :class:`SqliteStore` (the
service: one SQLite file in WAL mode, every decision or outcome committed as one
transaction, so a crash leaves either all of it or none) and :class:`MemoryStore`
(simulations and tests).

The model posterior is a snapshot (written every few outcomes and on shutdown) plus the
outcomes settled after it: every settled decision keeps its features, offer, outcome
and settlement sequence number, and :meth:`OfferStore.learned_after` gives the ones to
replay on top of the snapshot, so the restored posterior equals the one before the
restart exactly, while an outcome only writes its own small row.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from services.ranking.offers.bandit import ModelSnapshot

SCHEMA_VERSION = "2"


@dataclass(frozen=True)
class DecisionRecord:
    """A decision of the policy, pending until its outcome is recorded or it expires."""

    decision_id: str
    offer_id: str
    created_at: float
    period_key: str
    features: np.ndarray
    order_value: float
    margin: float
    reserved: float  # redemption cost reserved in the budget
    fixed_cost: float
    explored: bool = False
    status: str = "pending"  # pending | recorded | expired
    outcome: int = 0
    revenue: float = 0.0
    settled_at: float = 0.0
    seq: int = 0  # settlement order (0 while pending)
    learned: bool = False  # the outcome was fed to the model

    def settled(
        self, status: str, outcome: int, revenue: float, now: float, seq: int, learned: bool
    ) -> DecisionRecord:
        return replace(
            self,
            status=status,
            outcome=outcome,
            revenue=revenue,
            settled_at=now,
            seq=seq,
            learned=learned,
        )


@dataclass
class BudgetRow:
    reserved: float = 0.0
    spent: float = 0.0


@dataclass
class OfferCounts:
    decisions: int = 0
    redemptions: int = 0


@dataclass
class Writes:
    """Everything one policy operation changes; committed atomically."""

    decisions: list[DecisionRecord] = field(default_factory=list)
    budgets: dict[tuple[str, str], BudgetRow] = field(default_factory=dict)
    counts: dict[str, OfferCounts] = field(default_factory=dict)
    snapshot: ModelSnapshot | None = None
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class StoredState:
    """The policy state as last committed (decisions stay in the store)."""

    snapshot: ModelSnapshot | None = None
    budgets: dict[tuple[str, str], BudgetRow] = field(default_factory=dict)
    counts: dict[str, OfferCounts] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)


class OfferStore(Protocol):
    """Persistence of the offer policy."""

    def load(self) -> StoredState: ...

    def get_decision(self, decision_id: str) -> DecisionRecord | None: ...

    def pending_before(self, created_before: float, limit: int) -> list[DecisionRecord]: ...

    def learned_after(self, seq: int) -> list[DecisionRecord]: ...

    def purge(self, settled_before: float, max_seq: int) -> int:
        """Forget settled decisions settled before ``settled_before`` whose outcome is
        in the snapshot (``seq <= max_seq``); returns how many."""
        ...

    def commit(self, writes: Writes) -> None: ...

    def close(self) -> None: ...


def _copy_state(writes: Writes, state: StoredState) -> None:
    for period, row in writes.budgets.items():
        state.budgets[period] = BudgetRow(row.reserved, row.spent)
    for offer_id, counts in writes.counts.items():
        state.counts[offer_id] = OfferCounts(counts.decisions, counts.redemptions)
    if writes.snapshot is not None:
        state.snapshot = writes.snapshot
    state.meta.update(writes.meta)


class MemoryStore:
    """In-process store (nothing survives the process)."""

    def __init__(self) -> None:
        self.state = StoredState()
        self.decisions: dict[str, DecisionRecord] = {}
        self.pending: dict[str, DecisionRecord] = {}

    def load(self) -> StoredState:
        out = StoredState()
        snapshot = Writes(
            budgets=self.state.budgets,
            counts=self.state.counts,
            snapshot=self.state.snapshot,
            meta=self.state.meta,
        )
        _copy_state(snapshot, out)
        return out

    def get_decision(self, decision_id: str) -> DecisionRecord | None:
        return self.decisions.get(decision_id)

    def pending_before(self, created_before: float, limit: int) -> list[DecisionRecord]:
        out = [d for d in self.pending.values() if d.created_at < created_before]
        return sorted(out, key=lambda d: d.created_at)[:limit]

    def learned_after(self, seq: int) -> list[DecisionRecord]:
        out = [d for d in self.decisions.values() if d.learned and d.seq > seq]
        return sorted(out, key=lambda d: d.seq)

    def purge(self, settled_before: float, max_seq: int) -> int:
        old = [
            d.decision_id
            for d in self.decisions.values()
            if d.status != "pending" and d.settled_at < settled_before and d.seq <= max_seq
        ]
        for decision_id in old:
            del self.decisions[decision_id]
        return len(old)

    def commit(self, writes: Writes) -> None:
        for d in writes.decisions:
            self.decisions[d.decision_id] = d
            if d.status == "pending":
                self.pending[d.decision_id] = d
            else:
                self.pending.pop(d.decision_id, None)
        _copy_state(writes, self.state)

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS model (
    id INTEGER PRIMARY KEY CHECK (id = 1), arms TEXT NOT NULL, features TEXT NOT NULL,
    mean BLOB NOT NULL, cov BLOB NOT NULL, updates INTEGER NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS budgets (
    offer_id TEXT NOT NULL, period_key TEXT NOT NULL, reserved REAL NOT NULL,
    spent REAL NOT NULL, PRIMARY KEY (offer_id, period_key));
CREATE TABLE IF NOT EXISTS counts (
    offer_id TEXT PRIMARY KEY, decisions INTEGER NOT NULL, redemptions INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    decision_id TEXT PRIMARY KEY, offer_id TEXT NOT NULL, created_at REAL NOT NULL,
    period_key TEXT NOT NULL, features BLOB NOT NULL, order_value REAL NOT NULL,
    margin REAL NOT NULL, reserved REAL NOT NULL, fixed_cost REAL NOT NULL,
    explored INTEGER NOT NULL, status TEXT NOT NULL, outcome INTEGER NOT NULL,
    revenue REAL NOT NULL, settled_at REAL NOT NULL, seq INTEGER NOT NULL,
    learned INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS decisions_pending ON decisions (status, created_at);
CREATE INDEX IF NOT EXISTS decisions_seq ON decisions (seq);
"""

_DECISION_COLUMNS = (
    "decision_id, offer_id, created_at, period_key, features, order_value, margin, "
    "reserved, fixed_cost, explored, status, outcome, revenue, settled_at, seq, learned"
)


def _vec(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f8").copy()


def _blob(vec: np.ndarray) -> bytes:
    return np.asarray(vec, dtype="<f8").tobytes()


def _decision(row: tuple[Any, ...]) -> DecisionRecord:
    (did, offer, created, period, feats, order_value, margin, reserved, fixed) = row[:9]
    explored, status, outcome, revenue, settled, seq, learned = row[9:]
    return DecisionRecord(
        decision_id=did,
        offer_id=offer,
        created_at=created,
        period_key=period,
        features=_vec(feats),
        order_value=order_value,
        margin=margin,
        reserved=reserved,
        fixed_cost=fixed,
        explored=bool(explored),
        status=status,
        outcome=outcome,
        revenue=revenue,
        settled_at=settled,
        seq=seq,
        learned=bool(learned),
    )


class SqliteStore:
    """One SQLite file (WAL, ``synchronous=NORMAL``: a committed write survives a
    process crash; a power cut may lose the last commits but never corrupts)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.conn = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=30
        )
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_SCHEMA)
        found = self.conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if found is None:
            self.conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        elif found[0] != SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path}: offer state schema {found[0]}, this version reads {SCHEMA_VERSION}"
            )

    class _Tx:
        def __init__(self, store: SqliteStore) -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            self.store.conn.execute("BEGIN IMMEDIATE")
            return self.store.conn

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            try:
                self.store.conn.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.store._lock.release()

    def _tx(self) -> SqliteStore._Tx:
        return SqliteStore._Tx(self)

    def load(self) -> StoredState:
        with self._lock:
            c = self.conn
            state = StoredState()
            row = c.execute("SELECT arms, features, mean, cov, updates, seq FROM model").fetchone()
            if row:
                arms, feats, mean, cov, updates, seq = row
                m = _vec(mean)
                state.snapshot = ModelSnapshot(
                    tuple(json.loads(arms)),
                    feats,
                    m,
                    _vec(cov).reshape(m.size, m.size),
                    updates,
                    seq,
                )
            for offer, period, reserved, spent in c.execute("SELECT * FROM budgets"):
                state.budgets[(offer, period)] = BudgetRow(reserved, spent)
            for offer, decisions, redemptions in c.execute("SELECT * FROM counts"):
                state.counts[offer] = OfferCounts(decisions, redemptions)
            state.meta = dict(c.execute("SELECT key, value FROM meta"))
            return state

    def get_decision(self, decision_id: str) -> DecisionRecord | None:
        with self._lock:
            row = self.conn.execute(
                f"SELECT {_DECISION_COLUMNS} FROM decisions WHERE decision_id=?", (decision_id,)
            ).fetchone()
        return _decision(row) if row else None

    def pending_before(self, created_before: float, limit: int) -> list[DecisionRecord]:
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {_DECISION_COLUMNS} FROM decisions WHERE status='pending' "
                "AND created_at < ? ORDER BY created_at LIMIT ?",
                (created_before, limit),
            ).fetchall()
        return [_decision(r) for r in rows]

    def learned_after(self, seq: int) -> list[DecisionRecord]:
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {_DECISION_COLUMNS} FROM decisions WHERE seq > ? AND learned = 1 "
                "ORDER BY seq",
                (seq,),
            ).fetchall()
        return [_decision(r) for r in rows]

    def purge(self, settled_before: float, max_seq: int) -> int:
        with self._tx() as c:
            cur = c.execute(
                "DELETE FROM decisions WHERE status != 'pending' AND settled_at < ? AND seq <= ?",
                (settled_before, max_seq),
            )
            return int(cur.rowcount)

    def commit(self, writes: Writes) -> None:
        with self._tx() as c:
            c.executemany(
                f"INSERT OR REPLACE INTO decisions ({_DECISION_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        d.decision_id,
                        d.offer_id,
                        d.created_at,
                        d.period_key,
                        _blob(d.features),
                        d.order_value,
                        d.margin,
                        d.reserved,
                        d.fixed_cost,
                        int(d.explored),
                        d.status,
                        d.outcome,
                        d.revenue,
                        d.settled_at,
                        d.seq,
                        int(d.learned),
                    )
                    for d in writes.decisions
                ],
            )
            c.executemany(
                "INSERT OR REPLACE INTO budgets VALUES (?, ?, ?, ?)",
                [(o, p, r.reserved, r.spent) for (o, p), r in writes.budgets.items()],
            )
            c.executemany(
                "INSERT OR REPLACE INTO counts VALUES (?, ?, ?)",
                [(o, n.decisions, n.redemptions) for o, n in writes.counts.items()],
            )
            snap = writes.snapshot
            if snap is not None:
                c.execute(
                    "INSERT OR REPLACE INTO model VALUES (1, ?, ?, ?, ?, ?, ?)",
                    (
                        json.dumps(list(snap.arms)),
                        snap.features,
                        _blob(snap.mean),
                        _blob(snap.cov),
                        snap.updates,
                        snap.seq,
                    ),
                )
            c.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(writes.meta.items()))

    def close(self) -> None:
        with self._lock:
            self.conn.close()
