"""MovieLens ml-latest-small + posters, in contract form.

Layout under `spec.data`:  ml-latest-small/{movies,ratings,tags}.csv  and  posters/<movieId>.jpg

- label = rating >= 4.0 (float32), ts = rating timestamp, user_id / item_id = userId / movieId (kept as is, so
  item ids match poster file names and the public release).
- title = movie title; text = "Genres: ... Tags: ..." (genres and the users' free-text tags, most used first).
  Tags are aggregated over the whole file, including tags written after a split's cut: they describe the item,
  not a user's behaviour, but a strict time-travel audit should know.
- image_uri = "<movieId>.jpg" relative to image_root = posters/, where that poster exists and is valid.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.data.io import DataError, float32_column, int64_column, read_table
from pipelines.data.rules import INTERACTION_RULES, ITEM_ID_RULES, NOT_UNIX_SECONDS, first_failure, missing_cells
from pipelines.data.schema import DataSpec, Dataset
from pipelines.data.validate import RejectLog, finalize, reject_failures

log = logging.getLogger(__name__)

POSITIVE_RATING = 4.0


def load_movielens(spec: DataSpec) -> Dataset:
    """Load MovieLens from `spec.data` (see module docstring). Raises DataError for a missing/malformed file."""
    root = Path(spec.data)
    ml = root / "ml-latest-small"
    if not ml.is_dir() and (root / "movies.csv").exists():
        ml = root  # pointed straight at the ml-latest-small folder
    posters = root / "posters"
    if not (ml / "movies.csv").exists():
        raise DataError(f"{ml / 'movies.csv'}: file not found (expected --data DIR holding ml-latest-small/ and "
                        f"posters/)")
    rejects = RejectLog()

    movies = read_table(ml / "movies.csv", ["movieId", "title", "genres"])
    ratings = read_table(ml / "ratings.csv", ["userId", "movieId", "rating", "timestamp"])
    tags_path = ml / "tags.csv"
    tags = read_table(tags_path, ["movieId", "tag"]) if tags_path.exists() else None

    movie_ids, movie_unparsed = int64_column(movies, "movieId", role="item_id")
    n_movies = len(movies)
    checks = {"missing:item_id": missing_cells("movieId", "item_id", movie_ids, movie_unparsed),
              "item_id": movie_unparsed}
    missing_id = reject_failures(rejects, first_failure(ITEM_ID_RULES, checks, n_movies),
                                 src=np.full(n_movies, "movies.csv", dtype=object), rows=np.arange(n_movies),
                                 max_bad_fraction=spec.max_bad_fraction, what=f"{ml / 'movies.csv'} (items)",
                                 ids={"item_id": movies["movieId"].to_numpy(dtype=object)})

    genres = movies["genres"].fillna("").replace("(no genres listed)", "")
    text = _item_text(movie_ids, genres, tags)
    poster_files = set(os.listdir(posters)) if posters.is_dir() else set()
    uris = [f"{int(m)}.jpg" if pd.notna(m) and f"{int(m)}.jpg" in poster_files else None for m in movie_ids]
    items = pd.DataFrame({
        "item_id": movie_ids, "title": movies["title"].fillna(""), "text": text, "image_uri": uris,
        "genres": genres.str.replace("|", ", ", regex=False),
        "year": pd.to_numeric(movies["title"].str.extract(r"\((\d{4})\)\s*$")[0], errors="coerce").astype("Int64"),
        "row": np.arange(len(movies), dtype="int64"),
    }).loc[~missing_id]
    items["item_id"] = items["item_id"].astype("int64")

    columns = {"user_id": "userId", "item_id": "movieId", "ts": "timestamp", "label": "rating"}
    user, user_unparsed = int64_column(ratings, "userId", role="user_id")
    item, item_unparsed = int64_column(ratings, "movieId", role="item_id")
    rating, rating_unparsed = float32_column(ratings, "rating", role="rating")
    ts, ts_unparsed = int64_column(ratings, "timestamp", role="ts", what=NOT_UNIX_SECONDS)
    checks = {"user_id": user_unparsed, "item_id": item_unparsed, "ts": ts_unparsed, "label": rating_unparsed}
    for field, values in (("user_id", user), ("item_id", item), ("ts", ts), ("label", rating)):
        checks[f"missing:{field}"] = missing_cells(columns[field], field, values, checks[field])
    n_ratings = len(ratings)
    bad = reject_failures(rejects, first_failure(INTERACTION_RULES, checks, n_ratings),
                          src=np.full(n_ratings, "ratings.csv", dtype=object), rows=np.arange(n_ratings),
                          max_bad_fraction=spec.max_bad_fraction, what=f"{ml / 'ratings.csv'} (interactions)",
                          ids={"item_id": ratings["movieId"].to_numpy(dtype=object),
                               "user_id": ratings["userId"].to_numpy(dtype=object)})
    keep = ~bad
    interactions = pd.DataFrame({
        "user_id": user[keep].astype("int64").to_numpy(), "item_id": item[keep].astype("int64").to_numpy(),
        "ts": ts[keep].astype("int64").to_numpy(),
        "label": (rating[keep].to_numpy() >= POSITIVE_RATING).astype("float32"),
        "rating": rating[keep].to_numpy(), "row": np.flatnonzero(keep).astype("int64"),
    })
    log.info("movielens: %d movies (%d with a poster file), %d ratings", len(items), sum(u is not None for u in uris),
             len(interactions))
    return finalize(items, interactions, spec=spec, name="movielens", image_root=posters if posters.is_dir() else None,
                    rejects=rejects, items_source="movies.csv", interactions_source="ratings.csv")


def _item_text(movie_ids: pd.Series, genres: pd.Series, tags) -> list:
    """'Genres: a, b. Tags: x, y' per movie; tags deduplicated case-insensitively, most used first."""
    tag_text: dict[int, str] = {}
    if tags is not None and len(tags):
        t = pd.DataFrame({"movieId": pd.to_numeric(tags["movieId"], errors="coerce"),
                          "tag": tags["tag"].fillna("").astype(str).str.strip()})
        t = t[t["movieId"].notna() & t["tag"].ne("")]
        t["key"] = t["tag"].str.lower()
        counted = (t.groupby(["movieId", "key"], sort=False)
                   .agg(tag=("tag", "first"), n=("tag", "size")).reset_index()
                   .sort_values(["movieId", "n", "key"], ascending=[True, False, True]))
        for movie_id, group in counted.groupby("movieId", sort=False):
            tag_text[int(movie_id)] = ", ".join(group["tag"])
    out = []
    for movie_id, g in zip(movie_ids, genres):
        parts = []
        if g:
            parts.append("Genres: " + g.replace("|", ", ") + ".")
        if pd.notna(movie_id) and int(movie_id) in tag_text:
            parts.append("Tags: " + tag_text[int(movie_id)] + ".")
        out.append(" ".join(parts) if parts else None)
    return out
