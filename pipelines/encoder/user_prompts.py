"""VIP5-style multimodal personalized prompts: a user's behaviour written as one sequence of id, image and text
tokens (Geng et al., "VIP5: Towards Multimodal Foundation Models for Recommendation", its sequential / direct
recommendation prompts). Pure functions, no torch: the user encoder (pipelines.encoder.user_encoder) turns a
``UserPrompt`` into the LM's input embeddings.

A template is data (``TEMPLATES``, a small registry; ``register_template`` adds one), written with four
placeholders:
    {user}   the user's id token (one learned, hashed id embedding in the model; "user_<id>" in the text form)
    {item}   an event's item id token (likewise; "item_<id>")
    {image}  the item's image tokens (the item encoder's own vision tower + projector; "<image>" in the text form)
    {title}  the item's title (its first few word pieces)
``prefix`` (may hold {user}) + events (``event``, joined by ``separator``, oldest first) + ``suffix``. Example:

    >>> t = TEMPLATES["sequential"]
    >>> p = build_prompt(7, [(3, 10), (5, 20)], cut_ts=30, template=t, titles={3: "Heat", 5: "Up"},
    ...                  has_image={3}.__contains__)
    >>> p.render({3: "Heat", 5: "Up"})
    'user_7 has watched: item_3 <image> Heat ; item_5 Up ; what is the next item?'

Only events strictly before the cut are read (an event at the cut is the one being predicted, or simultaneous
with it); the last ``max_events`` are kept, and the oldest are dropped until the prompt fits ``token_budget``
(counted by ``cost``: the encoder passes its tokenizer's exact counts; the default counts words, one per id and
``image_tokens`` per image). A segment that costs 0 tokens (no image, an empty title) is left out.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

PLACEHOLDER = re.compile(r"\{(user|item|image|title)\}")
SEGMENT_KINDS = ("text", "user", "item", "image", "title")


@dataclass(frozen=True)
class PromptTemplate:
    """One prompt format. Args: name; prefix (text, may hold {user}); event (per item: {item}, {image}, {title}
    and text); separator (between events); suffix (the task instruction at the end)."""

    name: str
    prefix: str
    event: str
    separator: str
    suffix: str

    def __post_init__(self):
        if "{user}" in self.event or "{user}" in self.separator or "{user}" in self.suffix:
            raise ValueError(f"PromptTemplate {self.name!r}: {{user}} belongs in the prefix only")
        for part in ("prefix", "separator", "suffix"):
            if set(PLACEHOLDER.findall(getattr(self, part))) - {"user"}:
                raise ValueError(f"PromptTemplate {self.name!r}: item placeholders belong in `event`, not {part}")
        if "{item}" not in self.event and "{image}" not in self.event and "{title}" not in self.event:
            raise ValueError(f"PromptTemplate {self.name!r}: event names no item ({{item}}, {{image}} or {{title}})")
        leftover = PLACEHOLDER.sub("", self.prefix + self.event + self.separator + self.suffix)
        if re.search(r"\{[a-z_]+\}", leftover):
            raise ValueError(f"PromptTemplate {self.name!r}: unknown placeholder in {leftover!r}; "
                             "known: {user} {item} {image} {title}")


TEMPLATES: dict[str, PromptTemplate] = {}


def register_template(template: PromptTemplate) -> None:
    TEMPLATES[template.name] = template


# VIP5's sequential recommendation prompt family (A-x): history of id + image tokens, then the question.
register_template(PromptTemplate("sequential", "{user} has watched:", "{item} {image} {title}", ";",
                                 "; what is the next item?"))
# The same without id tokens: content only (the ablation of personalization by ids).
register_template(PromptTemplate("sequential-content", "a user has watched:", "{image} {title}", ";",
                                  "; what is the next item?"))
# Direct recommendation (B-x) style: the user token and the history as a list, an instruction first.
register_template(PromptTemplate("direct", "recommend an item to {user} , who liked", "{item} {image} {title}",
                                 ",", "."))


@dataclass(frozen=True)
class UserPrompt:
    """A rendered prompt. ``segments``: ((kind, value), ...) with kind in SEGMENT_KINDS; value is the text for
    "text", the user id for "user", the item id otherwise. ``item_ids``: the events read, oldest first."""

    user_id: int
    cut_ts: int
    item_ids: tuple
    segments: tuple

    def render(self, titles: Optional[Mapping[int, str]] = None) -> str:
        """Human-readable form (ids as user_<id> / item_<id>, images as <image>, titles from ``titles``)."""
        words = []
        for kind, value in self.segments:
            if kind == "text":
                words.append(value)
            elif kind == "user":
                words.append(f"user_{value}")
            elif kind == "item":
                words.append(f"item_{value}")
            elif kind == "image":
                words.append("<image>")
            else:
                words.append(str((titles or {}).get(int(value), f"<title:{value}>")))
        return " ".join(w for w in (w.strip() for w in words) if w)


def word_cost(image_tokens: int = 1, title_words: int = 4, titles: Optional[Mapping[int, str]] = None,
              has_image: Optional[Callable[[int], bool]] = None) -> Callable[[str, object], int]:
    """The default token count: one per word of text, one per id, ``image_tokens`` per image (0 when
    ``has_image`` says the item has none), at most ``title_words`` words of a title."""
    def cost(kind: str, value) -> int:
        if kind == "text":
            return len(str(value).split())
        if kind in ("user", "item"):
            return 1
        if kind == "image":
            return image_tokens if has_image is None or has_image(int(value)) else 0
        return min(title_words, len(str((titles or {}).get(int(value), "")).split()))
    return cost


def _split(text: str, values: Mapping[str, object]) -> list:
    """Template text -> [(kind, value)]: literal runs and placeholders in order."""
    out, pos = [], 0
    for m in PLACEHOLDER.finditer(text):
        if text[pos:m.start()].strip():
            out.append(("text", text[pos:m.start()].strip()))
        out.append((m.group(1), values[m.group(1)]))
        pos = m.end()
    if text[pos:].strip():
        out.append(("text", text[pos:].strip()))
    return out


def build_prompt(user_id: int, events: Sequence, cut_ts: int, template: PromptTemplate, max_events: int = 10,
                 token_budget: int = 128, titles: Optional[Mapping[int, str]] = None,
                 has_image: Optional[Callable[[int], bool]] = None,
                 cost: Optional[Callable[[str, object], int]] = None) -> UserPrompt:
    """One user's prompt at ``cut_ts``.

    Args:
        events: the user's positive events as (item_id, ts) in log order (any order is sorted by ts, stable).
        cut_ts: only events with ts < cut_ts are read.
        max_events: keep the last N events before the cut.
        token_budget: drop the oldest events until the whole prompt costs at most this many tokens (the fixed
            prefix + suffix always stay; a ValueError when they alone exceed the budget).
        titles / has_image: what {title} and {image} refer to (None: no titles / every item has an image).
        cost: (kind, value) -> tokens; default ``word_cost(titles=titles, has_image=has_image)``.
    """
    if max_events < 1 or token_budget < 1:
        raise ValueError(f"build_prompt: max_events and token_budget must be >= 1, got {max_events}, {token_budget}")
    cost = cost or word_cost(titles=titles, has_image=has_image)
    before = sorted(((int(i), int(t)) for i, t in events if int(t) < int(cut_ts)), key=lambda e: e[1])
    kept = [i for i, _ in before[-max_events:]]
    head = [s for s in _split(template.prefix, {"user": int(user_id)}) if cost(*s) > 0]
    tail = [s for s in _split(template.suffix, {}) if cost(*s) > 0]
    sep = [s for s in _split(template.separator, {}) if cost(*s) > 0]
    fixed = sum(cost(*s) for s in head + tail)
    if fixed > token_budget:
        raise ValueError(f"template {template.name!r}: prefix + suffix cost {fixed} tokens, over the budget "
                         f"{token_budget}")
    bodies = [[s for s in _split(template.event, {"item": i, "image": i, "title": i}) if cost(*s) > 0]
              for i in kept]
    costs = [sum(cost(*s) for s in b) for b in bodies]
    sep_cost = sum(cost(*s) for s in sep)
    while kept and fixed + sum(costs) + sep_cost * (len(kept) - 1) > token_budget:
        kept, bodies, costs = kept[1:], bodies[1:], costs[1:]
    segments = list(head)
    for n, body in enumerate(bodies):
        segments += (sep if n else []) + body
    return UserPrompt(int(user_id), int(cut_ts), tuple(kept), tuple(segments + tail))


def prompt_cost(prompt: UserPrompt, cost: Callable[[str, object], int]) -> int:
    return sum(cost(k, v) for k, v in prompt.segments)


def build_prompts(events_by_user: Mapping[int, Sequence], cuts: Iterable[tuple], template: PromptTemplate,
                  **kwargs) -> list:
    """``build_prompt`` for many (user_id, cut_ts) pairs; ``events_by_user``: user -> [(item_id, ts)]."""
    return [build_prompt(u, events_by_user.get(int(u), ()), c, template, **kwargs) for u, c in cuts]


def events_by_user(positives) -> dict:
    """user_id -> [(item_id, ts)] in log order, from a DataFrame of positive events (user_id, item_id, ts)."""
    out: dict = {}
    for u, i, t in zip(positives["user_id"].to_numpy(), positives["item_id"].to_numpy(), positives["ts"].to_numpy()):
        out.setdefault(int(u), []).append((int(i), int(t)))
    return out


def training_cuts(events: Mapping[int, Sequence], per_user: int) -> list:
    """(user_id, cut_ts, target item) for each user's last ``per_user`` positives that have at least one
    strictly earlier positive: the prompt is read before the target's time, the target is what comes next."""
    out = []
    for u, evs in events.items():
        evs = sorted(evs, key=lambda e: e[1])
        first_ts = evs[0][1]
        usable = [(i, t) for i, t in evs if t > first_ts]
        out += [(u, t, i) for i, t in usable[-per_user:]]
    return out


def next_item_cuts(window_positives) -> list:
    """(user_id, cut_ts, target item): each user's first positive of a window (the next item after the train
    portion); ties at the same ts take the first in log order."""
    first = window_positives.sort_values("ts", kind="stable").drop_duplicates("user_id", keep="first")
    return [(int(u), int(t), int(i)) for u, t, i in zip(first["user_id"], first["ts"], first["item_id"])]


def asof_cuts(events: Mapping[int, Sequence], per_user: int) -> list:
    """(user_id, cut_ts) of the point-in-time prompts (user_embeddings_asof.parquet), per user in ts order:
    ``per_user`` cuts spread evenly over the user's distinct positive times that have a strictly earlier positive
    (the first at its second positive time, so almost every training example of the user has a vector; a prompt
    cut there reads only what came before that positive), then the train-portion end of the user, its last
    positive's ts + 1 (the prompt reads every one of its train positives: the serving prompt's events).

    A ranker example of the user at time t reads the vector of the latest cut <= t (at most about 1 / per_user
    of the user's history stale); before the first cut it has none (zeros). Example: positives at ts 5, 5, 9, 12:
    per_user=2 -> cuts 9, 12, 13; per_user=1 -> 9, 13 (5 is the first time: nothing is before it)."""
    if per_user < 1:
        raise ValueError(f"asof_cuts: per_user must be >= 1, got {per_user}")
    out = []
    for u in sorted(events):
        times = sorted({int(t) for _, t in events[u]})
        if not times:
            continue
        candidates = times[1:]
        n = len(candidates)
        picked = candidates if per_user >= n else [candidates[(i * n) // per_user] for i in range(per_user)]
        out += [(int(u), t) for t in picked] + [(int(u), times[-1] + 1)]
    return out
