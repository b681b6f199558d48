"""PNG metadata: A1111 `parameters` text + zimage JSON, written atomically, read back exactly."""

from __future__ import annotations

import errno
import json
import os
import re

import pytest
from PIL import Image

from zimage.errors import UsageError, WriteError, ZImageError
from zimage.io.metadata import ImageMetadata
from zimage.io.png import encode_png, read_metadata, read_png_text, save_png
from zimage.version import __version__

META = ImageMetadata(prompt="a café at night, «neon»", negative_prompt="blurry", seed=1234, steps=9, guidance=3.5,
                     width=1024, height=768, model="Tongyi-MAI/Z-Image-Turbo",
                     model_revision="f332072aa78be7aecdf3ee76d5c247082da564a6", dtype="bf16")


def image():
    return Image.new("RGB", (16, 8), (10, 200, 30))


def test_a1111_parameters_exact():
    assert META.a1111_parameters() == (
        "a café at night, «neon»\n"
        "Negative prompt: blurry\n"
        "Steps: 9, Sampler: Euler (flow matching), CFG scale: 3.5, Seed: 1234, Size: 1024x768, Model: Z-Image-Turbo, "
        f"Model hash: f332072aa7, Version: zimage {__version__}"
    )


def test_a1111_without_negative_or_revision():
    m = ImageMetadata(prompt="x", negative_prompt="", seed=0, steps=1, guidance=0.0, width=256, height=256,
                      model="tiny-random", model_revision=None, dtype="fp32")
    assert m.a1111_parameters() == (f"x\nSteps: 1, Sampler: Euler (flow matching), CFG scale: 0, Seed: 0, "
                                    f"Size: 256x256, Model: tiny-random, Version: zimage {__version__}")


def test_save_and_read_back(tmp_path):
    path = save_png(image(), tmp_path / "a.png", META)
    assert path == tmp_path / "a.png"
    text = read_png_text(path)
    assert text["parameters"] == META.a1111_parameters()
    record = json.loads(text["zimage"])
    assert record["prompt"] == META.prompt and record["zimage_version"] == __version__
    assert set(record) == set(ImageMetadata.__dataclass_fields__)
    assert read_metadata(path) == META
    with Image.open(path) as im:
        assert im.getpixel((3, 3)) == (10, 200, 30)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_saved_file_gets_the_users_default_mode_not_the_temp_files_0600(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        path = save_png(image(), tmp_path / "a.png", META)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_encode_png_bytes_carry_metadata(tmp_path):
    data = encode_png(image(), META)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "b.png").write_bytes(data)
    assert read_metadata(tmp_path / "b.png") == META


def test_no_overwrite_unless_asked(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"old")
    with pytest.raises(UsageError, match="exists; pass --overwrite") as info:
        save_png(image(), target, META)
    assert info.value.param == "output" and target.read_bytes() == b"old"
    save_png(image(), target, META, overwrite=True)
    assert read_metadata(target) == META


class FailsMidWrite:
    """An image whose encoder writes part of the file, then gets an OSError from the file system (what a full disk,
    an exceeded quota or a file system remounted read-only does to PIL's writes)."""

    def __init__(self, errno_: int):
        self.errno = errno_

    def save(self, f, **kwargs):
        f.write(b"\x89PNG half")
        f.flush()
        raise OSError(self.errno, os.strerror(self.errno))


@pytest.mark.parametrize("errno_", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO])
def test_failed_write_is_a_write_error_and_leaves_nothing(tmp_path, errno_):
    target = tmp_path / "a.png"
    with pytest.raises(WriteError) as info:
        save_png(FailsMidWrite(errno_), target, META)
    assert str(info.value) == f"cannot write {target}: {os.strerror(errno_)}; no file was written"
    assert info.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("errno_", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_temporary_file_that_cannot_be_created_is_a_write_error(tmp_path, monkeypatch, errno_):
    """The error comes from creating the temporary file (a read-only file system, a folder the user may not write,
    no inodes left): the message names the target, not the temporary name."""
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if str(path).endswith(".part"):
            raise OSError(errno_, os.strerror(errno_), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    target = tmp_path / "a.png"
    with pytest.raises(WriteError, match=f"^cannot write {re.escape(str(target))}: {os.strerror(errno_)}; "):
        save_png(image(), target, META)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"old")
    with pytest.raises(WriteError) as info:
        save_png(FailsMidWrite(errno.ENOSPC), target, META, overwrite=True)
    assert str(info.value).endswith("; the existing file is unchanged")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_other_failures_leave_nothing_and_pass_through(tmp_path):
    class Interrupted:
        def save(self, f, **kwargs):
            f.write(b"\x89PNG half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_png(Interrupted(), tmp_path / "a.png", META)
    assert list(tmp_path.iterdir()) == []


def test_from_json_ignores_unknown_fields():
    data = json.loads(META.to_json())
    data["added_in_a_later_version"] = 1
    assert ImageMetadata.from_json(json.dumps(data)) == META


def test_damaged_json_chunk(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("zimage", "{not json")
    image().save(tmp_path / "bad.png", pnginfo=info)
    with pytest.raises(ZImageError, match="cannot be read") as exc:
        read_metadata(tmp_path / "bad.png")
    assert exc.value.exit_code == 1


def test_missing_fields_in_json_chunk(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("zimage", json.dumps({"prompt": "x"}))
    image().save(tmp_path / "partial.png", pnginfo=info)
    with pytest.raises(ZImageError, match="cannot be read"):
        read_metadata(tmp_path / "partial.png")


def test_no_metadata(tmp_path):
    image().save(tmp_path / "plain.png")
    with pytest.raises(UsageError, match="carries no zimage generation parameters") as info:
        read_metadata(tmp_path / "plain.png")
    assert info.value.param == "from_png" and str(tmp_path / "plain.png") in str(info.value)


def test_server_pngs_use_the_fast_zlib_level_and_stay_lossless():
    """The server encodes every image while its client waits: zlib level 1 (zimage.server.images.PNG_LEVEL), not
    Pillow's default 6. Same pixels and metadata, only the compression differs."""
    import io

    import numpy as np

    from zimage.server.images import PNG_LEVEL, encode_image

    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = encode_image(noisy, META, "png")
    assert PNG_LEVEL == 1
    assert data == encode_png(noisy, META, compress_level=1)
    assert data != encode_png(noisy, META)  # Pillow's default level writes other bytes
    back = Image.open(io.BytesIO(data))
    assert np.array_equal(np.asarray(back), np.asarray(noisy))
    assert json.loads(back.text["zimage"])["prompt"] == META.prompt
