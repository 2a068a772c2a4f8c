"""Time-based train / valid / test splits. There is deliberately no random split: recommendation models are
used on the future, so they are evaluated on it.

Methods:
- "global": two timestamp cuts at quantiles of all timestamps. Every valid event is at or after every train
  event, every test event at or after every valid event; users and items may be new in later parts (cold start
  is part of the test). Events sharing the cut timestamp all go to the later part, so no timestamp is split.
- "user_last_n": per user, the last `n_test` events go to test and the `n_valid` before them to valid. Models
  see each test user's earlier history (a warm-user evaluation). Ties in ts are broken by the input order.
- "user_last_frac": per user, the last max(1, round(test_frac * n_user)) events go to test and likewise
  `valid_frac` before them to valid; users with fewer than min_train + held-out events stay entirely in train.

On the MovieLens poster subset (58,498 ratings) `global` with test_frac=0.1 gives the 5,850 test rows and
`user_last_frac` with test_frac=0.1 the 5,860 test rows of the reference baselines in ../shared/data/movielens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from feature_store.config_tree import add_section_arguments, knob

METHODS = ("global", "user_last_n", "user_last_frac")


@dataclass(frozen=True)
class SplitConfig:
    """How to split; see the module docstring.

    Args:
        method: "global", "user_last_n" or "user_last_frac".
        valid_frac, test_frac: global and user_last_frac: shares of events (global: by timestamp quantile).
        n_valid, n_test: user_last_n: events per user.
        min_train: user_last_*: a user keeps at least this many events in train; users with fewer events
            than min_train + held-out stay wholly in train. The default 0 lets a one-event user be a test-only
            (cold) user, as in the reference MovieLens baselines; 1 makes every test user a warm one.
    """

    method: str = "global"
    valid_frac: float = 0.1
    test_frac: float = 0.1
    n_valid: int = 1
    n_test: int = 1
    min_train: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"SplitConfig.method: {self.method!r} is not one of {METHODS}")
        for name in ("valid_frac", "test_frac"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"SplitConfig.{name}: must be in [0, 1), got {v}")
        if self.valid_frac + self.test_frac >= 1.0:
            raise ValueError(f"SplitConfig: valid_frac + test_frac must be < 1, got {self.valid_frac + self.test_frac}")
        for name in ("n_valid", "n_test", "min_train"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"SplitConfig.{name}: must be an int >= 0, got {v!r}")


def time_split(interactions: pd.DataFrame, method: str = "global", **kwargs):
    """Split interactions by time.

    Args:
        interactions: contract interactions (user_id, item_id, ts, label, ...).
        method: see the module docstring; other keyword arguments are SplitConfig fields.
    Returns:
        (train, valid, test) DataFrames, each sorted by ts with a fresh index; together they hold every input
        row exactly once.
    """
    cfg = kwargs.pop("config", None) or SplitConfig(method=method, **kwargs)
    if "ts" not in interactions or "user_id" not in interactions:
        raise ValueError(f"time_split: interactions need columns ts and user_id; got {list(interactions.columns)}")
    part = split_labels(interactions, cfg)
    return tuple(interactions.loc[part == p].sort_values("ts", kind="stable").reset_index(drop=True)
                 for p in (0, 1, 2))


def split_labels(interactions: pd.DataFrame, cfg: SplitConfig) -> np.ndarray:
    """Part of each row, aligned with the input: 0 train, 1 valid, 2 test. (N,) int8."""
    ts = interactions["ts"].to_numpy()
    part = np.zeros(len(interactions), dtype=np.int8)
    if len(interactions) == 0:
        return part
    if cfg.method == "global":
        valid_cut, test_cut = global_cuts(ts, cfg.valid_frac, cfg.test_frac)
        part[ts >= valid_cut] = 1
        part[ts >= test_cut] = 2
        return part
    # Per user: position from the end in time order (0 = last event); ties in ts keep input order.
    order = np.lexsort((np.arange(len(ts)), ts, interactions["user_id"].to_numpy()))
    users = interactions["user_id"].to_numpy()[order]
    starts = np.r_[0, np.flatnonzero(users[1:] != users[:-1]) + 1]
    counts = np.diff(np.r_[starts, len(users)])
    count_per_row = np.repeat(counts, counts)
    from_end = count_per_row - 1 - (np.arange(len(users)) - np.repeat(starts, counts))
    part[order] = user_parts(count_per_row, from_end, cfg)
    return part


def user_parts(count: np.ndarray, from_end: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """The per-user split's part of each event from its user's event count and its position from that user's
    last event (0 = last): the last n_test (or rounded share) are test, the n_valid before them valid, unless the
    user has fewer than min_train + held-out events. The one rule `split_labels` (whole tables) and the workers
    (`pipelines.beam.protocol`, one user at a time) apply.

    Args:
        count, from_end: (N,) int arrays.
    Returns:
        (N,) int8: 0 train, 1 valid, 2 test.
    """
    count, from_end = np.asarray(count), np.asarray(from_end)
    if cfg.method == "user_last_n":
        n_test = np.full(len(count), cfg.n_test)
        n_valid = np.full(len(count), cfg.n_valid)
    else:
        n_test = _share(count, cfg.test_frac)
        n_valid = _share(count, cfg.valid_frac)
    eligible = count >= cfg.min_train + n_test + n_valid
    part = np.zeros(len(count), dtype=np.int8)
    part[eligible & (from_end < n_test + n_valid)] = 1
    part[eligible & (from_end < n_test)] = 2
    return part


def _share(counts: np.ndarray, frac: float) -> np.ndarray:
    """Events per user for a fraction: rounded to nearest (ties to even), at least 1 when frac > 0."""
    if frac <= 0:
        return np.zeros(len(counts), dtype=np.int64)
    return np.maximum(1, np.round(counts * frac)).astype(np.int64)


def global_cuts(ts: np.ndarray, valid_frac: float, test_frac: float) -> tuple[int, int]:
    """Timestamps (valid_cut, test_cut): rows with ts >= valid_cut are valid or test, ts >= test_cut test.

    With the n timestamps sorted, test_cut is the one at index n - round(test_frac * n) (so about test_frac of
    the rows are at or after it; more when the cut timestamp is shared), likewise valid_cut with
    valid_frac + test_frac. A part that rounds to zero rows gets a cut past the last event (it is empty).
    """
    ts = np.sort(np.asarray(ts))
    n = len(ts)

    def cut(frac: float) -> int:
        idx = n - int(round(frac * n))
        return int(ts[idx]) if idx < n else int(ts[-1]) + 1

    return cut(valid_frac + test_frac), cut(test_frac)


# ----------------------------------------------------------------------------------------------- protocol
# One protocol from pair mining to the ranker: a version records the split its behaviour-learned parts (pairs,
# alignment, codebooks) were fitted under, and every consumer (ranker, ablation, retrieval) checks it against the
# split it evaluates on before trusting the version's tables.

PROTOCOL_VERSION = 2  # 2: data_sha256 / train_sha256 are order-independent multiset digests (combinable)

FINGERPRINT_COLUMNS = (("user_id", np.int64), ("item_id", np.int64), ("ts", np.int64), ("label", np.float32))
_LANE2_KEY = "qarm-protocol-v2"  # 16 bytes: the second lane's siphash key
_MASK = (1 << 64) - 1


def fingerprint_partial(frame: pd.DataFrame, columns=FINGERPRINT_COLUMNS) -> tuple[int, int, int]:
    """(rows, lane1, lane2) of a block of rows: the combinable part of `interactions_fingerprint`.

    Each row (by default user_id, item_id, ts as int64, label as float32; ``columns`` names others as
    (column, numpy dtype or object), object columns hashed as text with None distinct from "") is hashed to 64
    bits (pandas' siphash of the row); lane1 sums those hashes, lane2 sums a second keyed hash of them, both mod
    2**64. Sums do not depend on row order, so blocks read anywhere (Beam workers) merge with
    `fingerprint_merge` into the whole table's digest.
    """
    n = len(frame)
    if n == 0:
        return (0, 0, 0)
    cols = {}
    for c, t in columns:
        if t is object:
            cols[c] = np.array(["\x00" if v is None or (isinstance(v, float) and np.isnan(v)) else "\x01" + str(v)
                                for v in frame[c].tolist()], dtype=object)
        else:
            cols[c] = frame[c].to_numpy(dtype=t)
    h = pd.util.hash_pandas_object(pd.DataFrame(cols), index=False).to_numpy(np.uint64)
    h2 = pd.util.hash_array(h, hash_key=_LANE2_KEY)
    return (int(n), int(h.sum(dtype=np.uint64)), int(h2.sum(dtype=np.uint64)))  # uint64 sums wrap mod 2**64


def fingerprint_merge(parts) -> tuple[int, int, int]:
    """Sum of `fingerprint_partial` tuples (the combine step)."""
    n = l1 = l2 = 0
    for a, b, c in parts:
        n, l1, l2 = n + int(a), (l1 + int(b)) & _MASK, (l2 + int(c)) & _MASK
    return (n, l1, l2)


def fingerprint_hex(partial) -> str:
    """The digest of merged partials: sha256 over the row count and both lane sums."""
    import hashlib

    n, l1, l2 = partial
    return hashlib.sha256(f"qarm-events/2:{int(n)}:{int(l1)}:{int(l2)}".encode()).hexdigest()


def interactions_fingerprint(interactions: pd.DataFrame) -> str:
    """Digest of the contract columns (user_id, item_id, ts, label) as a multiset of rows: the data a split is
    over. Row order does not matter (a repeated row counts twice), so workers compute it as a combine
    (`pipelines.beam.protocol.ProtocolRecord`) and the ranker re-derives it from the loaded log."""
    return fingerprint_hex(fingerprint_partial(interactions))


def protocol_aggregates(interactions: pd.DataFrame, part) -> dict:
    """The protocol record's combinable part of a block of events and their parts (0 train, 1 valid, 2 test):
    counts, last train ts, last ts, first ts of the valid+test and of the test part, and the multiset digests of
    all events and of the train ones (`fingerprint_partial`). Blocks read anywhere merge with
    `merge_protocol_aggregates`; `protocol_from_aggregates` turns the merge into the record.

    Args:
        interactions: contract interactions (user_id, item_id, ts, label) of the block.
        part: (N,) int, aligned with the rows.
    """
    part = np.asarray(part)
    ts = interactions["ts"].to_numpy(dtype=np.int64)
    train = part == 0

    def pick(fn, values):
        return int(fn(values)) if len(values) else None

    return {"events": int(len(ts)), "train_events": int(train.sum()), "train_max_ts": pick(np.max, ts[train]),
            "max_ts": pick(np.max, ts), "first_valid_ts": pick(np.min, ts[part >= 1]),
            "first_test_ts": pick(np.min, ts[part == 2]), "data": fingerprint_partial(interactions),
            "train": fingerprint_partial(interactions.loc[train])}


def merge_protocol_aggregates(aggs) -> dict:
    """The aggregates of the union of the blocks (the combine step of `protocol_aggregates`)."""
    aggs = list(aggs)

    def pick(fn, key):
        values = [a[key] for a in aggs if a[key] is not None]
        return fn(values) if values else None

    return {"events": sum(a["events"] for a in aggs), "train_events": sum(a["train_events"] for a in aggs),
            "train_max_ts": pick(max, "train_max_ts"), "max_ts": pick(max, "max_ts"),
            "first_valid_ts": pick(min, "first_valid_ts"), "first_test_ts": pick(min, "first_test_ts"),
            "data": fingerprint_merge(a["data"] for a in aggs), "train": fingerprint_merge(a["train"] for a in aggs)}


def protocol_from_aggregates(agg: dict, cfg: SplitConfig) -> dict:
    """What a version stores under ``manifest["protocol"]``, from the merged `protocol_aggregates` of every event.

    Returns:
        {"version", "split": SplitConfig fields, "data_sha256", "events", "train_events", "train_max_ts",
         "valid_start_ts" / "test_start_ts" (global cuts), "train_sha256"}: a per-user split is re-derived from
        the split parameters and the data (``train_sha256`` confirms the re-derivation). A global cut is the first
        ts of its later part (every event at or after a cut is in it, none before), or past the last event
        (max + 1) when that part is empty: exactly `global_cuts`.
    """
    from dataclasses import asdict

    rec = {"version": PROTOCOL_VERSION, "split": asdict(cfg), "data_sha256": fingerprint_hex(agg["data"]),
           "events": int(agg["events"]), "train_events": int(agg["train_events"]),
           "train_max_ts": agg["train_max_ts"], "train_sha256": fingerprint_hex(agg["train"])}
    if cfg.method == "global" and agg["events"]:
        past = int(agg["max_ts"]) + 1
        rec["valid_start_ts"] = past if agg["first_valid_ts"] is None else int(agg["first_valid_ts"])
        rec["test_start_ts"] = past if agg["first_test_ts"] is None else int(agg["first_test_ts"])
    return rec


def protocol_record(interactions: pd.DataFrame, cfg: SplitConfig) -> dict:
    """`protocol_from_aggregates` of a whole table (the workers build the same record as a combine of blocks,
    `pipelines.beam.protocol.ProtocolRecord`)."""
    return protocol_from_aggregates(protocol_aggregates(interactions, split_labels(interactions, cfg)), cfg)


def behaviour_free_protocol(reason: str) -> dict:
    """The record of a version that learned nothing from interactions (e.g. codes of a frozen encoder or test
    fixtures): any split may use it."""
    return {"version": PROTOCOL_VERSION, "behaviour_free": True, "reason": reason}


def protocol_problems(recorded: dict | None, interactions: pd.DataFrame, cfg: SplitConfig) -> list[str]:
    """Why a version built under ``recorded`` must not be evaluated with split ``cfg`` on ``interactions``
    (empty list: it may).

    A version is refused when it records no protocol, a different split, or training data that reaches past
    this split's train portion: with a global cut, its last training event must be before this split's first
    validation event; a per-user split must be re-derivable on the same data.
    """
    from dataclasses import asdict

    if not recorded:
        return ["the version records no protocol (manifest['protocol'] is missing): its pairs, alignment and "
                "codebooks may have seen validation or test events"]
    if recorded.get("behaviour_free"):
        return []
    problems = []
    want = asdict(cfg)
    have = recorded.get("split", {})
    if have != want:
        problems.append(f"built with split {_fmt(have)}, evaluated with split {_fmt(want)}")
    if len(interactions) == 0:
        return problems
    if cfg.method == "global":
        valid_start, _ = global_cuts(interactions["ts"].to_numpy(), cfg.valid_frac, cfg.test_frac)
        last = recorded.get("train_max_ts")
        if last is not None and last >= valid_start:
            problems.append(f"its training data reaches ts {last}, at or past this split's first validation "
                            f"event (ts {valid_start})")
    elif recorded.get("data_sha256") != interactions_fingerprint(interactions):
        problems.append("a per-user split over different data cannot be re-derived (data sha256 "
                        f"{str(recorded.get('data_sha256'))[:12]} at build time vs "
                        f"{interactions_fingerprint(interactions)[:12]} now)")
    return problems


def _fmt(split: dict) -> str:
    if not split:
        return "(none)"
    method = split.get("method")
    keys = {"global": ("valid_frac", "test_frac"), "user_last_n": ("n_valid", "n_test", "min_train"),
            "user_last_frac": ("valid_frac", "test_frac", "min_train")}.get(method, tuple(split))
    return f"{method}(" + ", ".join(f"{k}={split.get(k)}" for k in keys) + ")"


class ProtocolMismatchError(ValueError):
    """A store version built under another protocol than the one it is evaluated with."""


def check_protocol(recorded: dict | None, interactions: pd.DataFrame, cfg: SplitConfig, version_id: str = "",
                   allow_mismatch: bool = False) -> list[str]:
    """Raise ProtocolMismatchError (naming both protocols) unless ``allow_mismatch``; returns the problems."""
    problems = protocol_problems(recorded, interactions, cfg)
    if problems and not allow_mismatch:
        raise ProtocolMismatchError(
            f"store version {version_id or '?'} does not match this evaluation's protocol: " + "; ".join(problems)
            + ". Rebuild it with `qarm pipeline` and the same --split flags, or pass --allow-protocol-mismatch "
              "(the report then says so).")
    return problems


@dataclass(frozen=True)
class SplitSection:
    """The protocol's time split (`feature_store.split.SplitConfig`, whose defaults these are)."""

    split: str = knob(SplitConfig.method, "time split: global timestamp cuts, or each user's last fraction / last n "
                                          "events", choices=METHODS)
    valid_frac: float = knob(SplitConfig.valid_frac, "validation share of events (global / user_last_frac)")
    test_frac: float = knob(SplitConfig.test_frac, "test share of events (global / user_last_frac)")
    n_valid: int = knob(SplitConfig.n_valid, "user_last_n: validation events per user")
    n_test: int = knob(SplitConfig.n_test, "user_last_n: test events per user")
    min_train: int = knob(SplitConfig.min_train, "user_last_*: events a user keeps in train before any is held out")

    def __post_init__(self):
        self.config()  # SplitConfig validates

    def config(self) -> SplitConfig:
        return SplitConfig(method=self.split, valid_frac=float(self.valid_frac), test_frac=float(self.test_frac),
                           n_valid=int(self.n_valid), n_test=int(self.n_test), min_train=int(self.min_train))


def add_split_arguments(parser) -> None:
    """The split flags every command of one protocol shares (`qarm pipeline`, `qarm eval`, `qarm train-ranker`,
    `qarm distill`), generated from SplitSection: --split --valid-frac --test-frac --n-valid --n-test --min-train."""
    add_section_arguments(parser, SplitSection, title="time split (one protocol from pair mining to the ranker)")


def split_from_args(args) -> SplitConfig:
    """SplitConfig from the flags of :func:`add_split_arguments` (argparse Namespace or Beam options view)."""
    return SplitSection(split=args.split, valid_frac=float(args.valid_frac), test_frac=float(args.test_frac),
                        n_valid=int(args.n_valid), n_test=int(args.n_test), min_train=int(args.min_train)).config()
