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
from urllib.parse import urlsplit

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


class SharedOfferStore(OfferStore, Protocol):
    """A store several replicas share: budgets and settlements by atomic operations."""

    shared: bool

    def budget(self, offer_id: str, period_key: str) -> BudgetRow: ...

    def counts(self) -> dict[str, OfferCounts]: ...

    def reserve(self, decision: DecisionRecord, cap: float) -> bool: ...

    def settle(
        self,
        d: DecisionRecord,
        status: str,
        outcome: int,
        revenue: float,
        now: float,
        spent: float,
        redeemed: bool,
        learn: bool,
    ) -> tuple[str, int]: ...


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


# ---------------------------------------------------------------------------- Redis

# Reserve a decision's cost in its budget, only if it fits, and record the decision: one
# atomic step, so replicas sharing the store never overspend together.
_RESERVE = """
local cap = tonumber(ARGV[1])
local dr = tonumber(ARGV[2])
local ds = tonumber(ARGV[3])
if cap > 0 then
  local r = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
  local s = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
  if r + s + dr + ds > cap + 1e-9 then return 0 end
end
redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', ARGV[2])
redis.call('HINCRBYFLOAT', KEYS[1], 'spent', ARGV[3])
redis.call('SADD', KEYS[5], ARGV[4])
redis.call('HINCRBY', KEYS[2], ARGV[5] .. ':d', 1)
redis.call('HSET', KEYS[3], unpack(ARGV, 8))
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[6])
return 1
"""

# Settle a pending decision (recorded or expired): release its reservation, charge what
# was spent, count a redemption, number it in the settlement order. Only once: a decision
# another replica settled first is left alone (returns its status).
_SETTLE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {-1, 0} end
if status ~= 'pending' then return {status, 0} end
local seq = redis.call('INCR', KEYS[7])
local held = tonumber(redis.call('HGET', KEYS[1], 'reserved'))
local r = tonumber(redis.call('HGET', KEYS[2], 'reserved') or '0') - held
if r < 0 then r = 0 end
redis.call('HSET', KEYS[2], 'reserved', tostring(r))
redis.call('HINCRBYFLOAT', KEYS[2], 'spent', ARGV[6])
if ARGV[7] == '1' then redis.call('HINCRBY', KEYS[3], ARGV[8] .. ':r', 1) end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'outcome', ARGV[3], 'revenue', ARGV[4],
  'settled_at', ARGV[5], 'seq', seq, 'learned', ARGV[9])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[6], ARGV[5], ARGV[1])
if ARGV[9] == '1' then redis.call('ZADD', KEYS[5], seq, ARGV[1]) end
return {1, seq}
"""

# Keep the newest posterior snapshot: replicas write theirs, the one with the highest
# settlement sequence stays.
_SNAPSHOT = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1')
if tonumber(ARGV[1]) < cur then return 0 end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], unpack(ARGV, 2))
return 1
"""

_DECISION_FIELDS = (
    "offer_id",
    "created_at",
    "period_key",
    "features",
    "order_value",
    "margin",
    "reserved",
    "fixed_cost",
    "explored",
    "status",
    "outcome",
    "revenue",
    "settled_at",
    "seq",
    "learned",
)


def _decision_fields(d: DecisionRecord) -> list[Any]:
    return [
        "offer_id",
        d.offer_id,
        "created_at",
        repr(d.created_at),
        "period_key",
        d.period_key,
        "features",
        _blob(d.features),
        "order_value",
        repr(d.order_value),
        "margin",
        repr(d.margin),
        "reserved",
        repr(d.reserved),
        "fixed_cost",
        repr(d.fixed_cost),
        "explored",
        int(d.explored),
        "status",
        d.status,
        "outcome",
        d.outcome,
        "revenue",
        repr(d.revenue),
        "settled_at",
        repr(d.settled_at),
        "seq",
        d.seq,
        "learned",
        int(d.learned),
    ]


def _decision_from_hash(decision_id: str, h: dict[bytes, bytes]) -> DecisionRecord:
    def s(name: str) -> str:
        return h[name.encode()].decode()

    return DecisionRecord(
        decision_id=decision_id,
        offer_id=s("offer_id"),
        created_at=float(s("created_at")),
        period_key=s("period_key"),
        features=_vec(h[b"features"]),
        order_value=float(s("order_value")),
        margin=float(s("margin")),
        reserved=float(s("reserved")),
        fixed_cost=float(s("fixed_cost")),
        explored=s("explored") == "1",
        status=s("status"),
        outcome=int(s("outcome")),
        revenue=float(s("revenue")),
        settled_at=float(s("settled_at")),
        seq=int(s("seq")),
        learned=s("learned") == "1",
    )


class RedisStore:
    """The policy state in Redis, shared by every ranking replica (``shared = True``).

    Budgets and counters are changed by atomic scripts (reserve only if the budget holds;
    settle a decision once), so N replicas together spend at most the budget, and an
    outcome may land on any replica. Settled outcomes get a global sequence number; each
    replica replays them onto its posterior in that order (:meth:`learned_after`), so all
    replicas converge on the same model. Durability is Redis' (AOF with ``appendfsync
    everysec`` in the deployment: a crash of Redis may lose the last second).
    """

    shared = True

    def __init__(self, url: str, prefix: str = "mercato-offers:") -> None:
        import redis

        parts = urlsplit(url)
        self.address = f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"  # no password
        self.prefix = prefix
        # Any: redis-py types replies as bytes | str by client option; ours are bytes.
        client: Any = redis.Redis.from_url(url, socket_timeout=5, health_check_interval=30)
        self.r = client
        self._reserve = self.r.register_script(_RESERVE)
        self._settle = self.r.register_script(_SETTLE)
        self._snapshot = self.r.register_script(_SNAPSHOT)
        meta = self.k("meta")
        self.r.hsetnx(meta, "schema", SCHEMA_VERSION)
        found = self.r.hget(meta, "schema")
        if found is not None and found.decode() != SCHEMA_VERSION:
            raise RuntimeError(
                f"{prefix}: offer state schema {found.decode()}, this version reads "
                f"{SCHEMA_VERSION}"
            )

    def k(self, name: str) -> str:
        return self.prefix + name

    def budget_key(self, offer_id: str, period_key: str) -> str:
        return self.k(f"b:{offer_id}:{period_key}")

    def decision_key(self, decision_id: str) -> str:
        return self.k(f"d:{decision_id}")

    # ------------------------------------------------------------ OfferStore protocol

    def load(self) -> StoredState:
        state = StoredState()
        model = self.r.hgetall(self.k("model"))
        if model:
            m = _vec(model[b"mean"])
            state.snapshot = ModelSnapshot(
                tuple(json.loads(model[b"arms"])),
                model[b"features"].decode(),
                m,
                _vec(model[b"cov"]).reshape(m.size, m.size),
                int(model[b"updates"]),
                int(model[b"seq"]),
            )
        for member in self.r.smembers(self.k("budgets")):
            offer, _, period = member.decode().partition("\x1f")
            state.budgets[(offer, period)] = self.budget(offer, period)
        state.counts = self.counts()
        state.meta = {k.decode(): v.decode() for k, v in self.r.hgetall(self.k("meta")).items()}
        state.meta["seq"] = (self.r.get(self.k("seq")) or b"0").decode()
        return state

    def get_decision(self, decision_id: str) -> DecisionRecord | None:
        h = self.r.hgetall(self.decision_key(decision_id))
        return _decision_from_hash(decision_id, h) if h else None

    def _decisions(self, ids: list[bytes]) -> list[DecisionRecord]:
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self.decision_key(i.decode()))
        return [
            _decision_from_hash(i.decode(), h)
            for i, h in zip(ids, pipe.execute(), strict=True)
            if h
        ]

    def pending_before(self, created_before: float, limit: int) -> list[DecisionRecord]:
        ids = self.r.zrangebyscore(
            self.k("pending"), "-inf", f"({created_before!r}", start=0, num=limit
        )
        return [d for d in self._decisions(ids) if d.status == "pending"]

    def learned_after(self, seq: int) -> list[DecisionRecord]:
        ids = self.r.zrangebyscore(self.k("learned"), f"({seq}", "+inf")
        return sorted(self._decisions(ids), key=lambda d: d.seq)

    def purge(self, settled_before: float, max_seq: int) -> int:
        ids = self.r.zrangebyscore(self.k("settled"), "-inf", f"({settled_before!r}")
        old = [d for d in self._decisions(ids) if d.seq <= max_seq]
        if old:
            pipe = self.r.pipeline(transaction=True)
            for d in old:
                pipe.delete(self.decision_key(d.decision_id))
                pipe.zrem(self.k("settled"), d.decision_id)
                pipe.zrem(self.k("learned"), d.decision_id)
            pipe.execute()
        return len(old)

    def commit(self, writes: Writes) -> None:
        """Absolute writes (what a single-writer store does); the policy uses
        :meth:`reserve` and :meth:`settle` for budgets and decisions on this store."""
        pipe = self.r.pipeline(transaction=True)
        for d in writes.decisions:
            pipe.hset(self.decision_key(d.decision_id), mapping=dict(_pairs(_decision_fields(d))))
            if d.status == "pending":
                pipe.zadd(self.k("pending"), {d.decision_id: d.created_at})
            else:
                pipe.zrem(self.k("pending"), d.decision_id)
                pipe.zadd(self.k("settled"), {d.decision_id: d.settled_at})
                if d.learned:
                    pipe.zadd(self.k("learned"), {d.decision_id: d.seq})
        for (offer, period), row in writes.budgets.items():
            pipe.hset(
                self.budget_key(offer, period),
                mapping={"reserved": repr(row.reserved), "spent": repr(row.spent)},
            )
            pipe.sadd(self.k("budgets"), f"{offer}\x1f{period}")
        for offer, n in writes.counts.items():
            pipe.hset(
                self.k("counts"), mapping={f"{offer}:d": n.decisions, f"{offer}:r": n.redemptions}
            )
        if writes.meta:
            pipe.hset(self.k("meta"), mapping={k: v for k, v in writes.meta.items() if k != "seq"})
        pipe.execute()
        if writes.snapshot is not None:
            self.write_snapshot(writes.snapshot)

    def close(self) -> None:
        self.r.close()

    # ------------------------------------------------------------ shared-state operations

    def budget(self, offer_id: str, period_key: str) -> BudgetRow:
        h = self.r.hgetall(self.budget_key(offer_id, period_key))
        return BudgetRow(float(h.get(b"reserved", 0)), float(h.get(b"spent", 0)))

    def counts(self) -> dict[str, OfferCounts]:
        out: dict[str, OfferCounts] = {}
        for field_name, value in self.r.hgetall(self.k("counts")).items():
            offer, _, kind = field_name.decode().rpartition(":")
            row = out.setdefault(offer, OfferCounts())
            if kind == "d":
                row.decisions = int(value)
            else:
                row.redemptions = int(value)
        return out

    def reserve(self, decision: DecisionRecord, cap: float) -> bool:
        """Record ``decision`` and hold its costs in its budget if they fit under ``cap``
        (0 = no budget); False, with nothing written, when they do not."""
        d = decision
        ok = self._reserve(
            keys=[
                self.budget_key(d.offer_id, d.period_key),
                self.k("counts"),
                self.decision_key(d.decision_id),
                self.k("pending"),
                self.k("budgets"),
            ],
            args=[
                repr(cap),
                repr(d.reserved),
                repr(d.fixed_cost),
                f"{d.offer_id}\x1f{d.period_key}",
                d.offer_id,
                d.decision_id,
                repr(d.created_at),
                *_decision_fields(d),
            ],
        )
        return bool(ok)

    def settle(
        self,
        d: DecisionRecord,
        status: str,
        outcome: int,
        revenue: float,
        now: float,
        spent: float,
        redeemed: bool,
        learn: bool,
    ) -> tuple[str, int]:
        """Settle ``d`` once. Returns ("settled", seq), or (its status, 0) when it was
        settled already, or ("missing", 0)."""
        res = self._settle(
            keys=[
                self.decision_key(d.decision_id),
                self.budget_key(d.offer_id, d.period_key),
                self.k("counts"),
                self.k("pending"),
                self.k("learned"),
                self.k("settled"),
                self.k("seq"),
            ],
            args=[
                d.decision_id,
                status,
                outcome,
                repr(revenue),
                repr(now),
                repr(spent),
                "1" if redeemed else "0",
                d.offer_id,
                "1" if learn else "0",
            ],
        )
        first, seq = res
        if first == -1:
            return "missing", 0
        if first == 1:
            return "settled", int(seq)
        return first.decode() if isinstance(first, bytes) else str(first), 0

    def write_snapshot(self, snap: ModelSnapshot) -> None:
        self._snapshot(
            keys=[self.k("model")],
            args=[
                snap.seq,
                "arms",
                json.dumps(list(snap.arms)),
                "features",
                snap.features,
                "mean",
                _blob(snap.mean),
                "cov",
                _blob(snap.cov),
                "updates",
                snap.updates,
            ],
        )


def _pairs(flat: list[Any]) -> list[tuple[Any, Any]]:
    return list(zip(flat[::2], flat[1::2], strict=True))
