"""Image loading and validity checks."""
from __future__ import annotations

import os

import pytest

from pipelines.data.images import ImageError, check_image, load_image, resolve_image_path


def test_load_image_converts_to_rgb(tmp_path, png):
    from PIL import Image
    Image.new("L", (5, 7), 128).save(tmp_path / "g.png")
    img = load_image("g.png", tmp_path)
    assert img.mode == "RGB" and img.size == (5, 7)


@pytest.mark.parametrize("uri, reason", [("nope.png", "missing_image"), ("bad.png", "corrupt_image"),
                                         ("../x.png", "image_escapes_root"), ("", "missing_image")])
def test_errors_carry_a_reason(tmp_path, png, uri, reason):
    root = tmp_path / "root"
    root.mkdir()
    (root / "bad.png").write_bytes(b"\x89PNG garbage")
    png(tmp_path / "x.png")
    for call in (lambda: load_image(uri, root), lambda: check_image(uri, root, "header")):
        with pytest.raises(ImageError) as err:
            call()
        assert err.value.reason == reason and isinstance(err.value, ValueError)


def test_symlink_out_of_root_is_refused(tmp_path, png):
    root = tmp_path / "root"
    root.mkdir()
    png(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    with pytest.raises(ImageError) as err:
        resolve_image_path("link.png", root)
    assert err.value.reason == "image_escapes_root"


def test_empty_file_is_corrupt_even_at_exists_level(tmp_path):
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(ImageError) as err:
        check_image("e.png", tmp_path, "exists")
    assert err.value.reason == "corrupt_image"


def test_remote_uris_are_never_fetched(tmp_path):
    with pytest.raises(ImageError, match="never fetched") as err:
        check_image("https://example.com/a.jpg", tmp_path)
    assert err.value.reason == "missing_image"
