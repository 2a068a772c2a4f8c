"""Image-check benchmark: the cost per item of each `--validate-images` level (`pipelines.data.images.check_image`).

Two sets: MovieLens posters (small JPEGs, when ../shared/data/movielens/posters exists) and generated 1000x1500
JPEG photos. Prints milliseconds per item, best of --repeats loops over the whole set, and whether each level
catches a truncated JPEG (the reason `draft`, not `header`, is the default).

    .venv/bin/python bench/image_checks.py [--posters DIR] [--n 500] [--repeats 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines.data.images import ImageError, check_image  # noqa: E402
from pipelines.data.schema import IMAGE_CHECKS  # noqa: E402

LEVELS = [level for level in IMAGE_CHECKS if level != "exists"]


def ms_per_item(root: Path, names: list[str], level: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for name in names:
            check_image(name, root, level)
        best = min(best, (time.perf_counter() - t0) / len(names))
    return round(best * 1e3, 3)


def photos(folder: Path, n: int) -> list[str]:
    """n synthetic 1000x1500 JPEG photos (a gradient plus noise, quality 85)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 1000)[None, :, None]
    for i in range(n):
        Image.fromarray((rng.random((1500, 1000, 3)) * 40 + ramp).astype(np.uint8)).save(folder / f"{i}.jpg",
                                                                                         quality=85)
    return [f"{i}.jpg" for i in range(n)]


def catches_truncation(folder: Path, source: Path) -> dict:
    data = source.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    out = {}
    for level in LEVELS:
        try:
            check_image("truncated.jpg", folder, level)
            out[level] = False
        except ImageError:
            out[level] = True
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posters", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens" / "posters")
    parser.add_argument("--n", type=int, default=500, help="posters to time")
    parser.add_argument("--photos", type=int, default=20, help="generated 1000x1500 photos to time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = photos(tmp, args.photos)
        result["photo_1000x1500_ms_per_item"] = {lv: ms_per_item(tmp, names, lv, args.repeats) for lv in LEVELS}
        result["catches_truncated_jpeg"] = catches_truncation(tmp, tmp / names[0])
    if args.posters.is_dir():
        names = sorted(p.name for p in args.posters.glob("*.jpg"))[: args.n]
        result["poster_ms_per_item"] = {lv: ms_per_item(args.posters, names, lv, args.repeats) for lv in LEVELS}
        result["posters"] = len(names)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
