"""zimage.io.input_image: every rule an input picture or mask must meet, each bad input a UsageError naming it, the
sizes (default rounding, resize modes, mask alignment), outpainting, and the tensors against diffusers' processor."""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from zimage.errors import UsageError
from zimage.io import input_image as ii
from zimage.io.input_image import (
    InputImage, expand_to, image_to_tensor, load_image, load_mask, mask_to_tensor, outpaint, parse_margins,
    prepare_inputs,
)


def save(img: Image.Image, path, fmt: str = "PNG", **kwargs):
    img.save(path, fmt, **kwargs)
    return path


def stripes(width: int = 512, height: int = 256) -> Image.Image:
    """Red | green | blue vertical stripes: quarter, half, quarter of the width."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 4] = (255, 0, 0)
    arr[:, width // 4 : 3 * width // 4] = (0, 255, 0)
    arr[:, 3 * width // 4 :] = (0, 0, 255)
    return Image.fromarray(arr)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def bad(fn, *args, match: str, param: str | None = None, **kwargs) -> str:
    with pytest.raises(UsageError, match=match) as info:
        fn(*args, **kwargs)
    if param is not None:
        assert info.value.param == param
    return str(info.value)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with one tiny IDAT: a decompression-bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- files that are not acceptable pictures


def test_missing_empty_directory(tmp_path):
    bad(load_image, tmp_path / "nope.png", match="nope.png does not exist", param="image")
    (tmp_path / "empty.png").write_bytes(b"")
    bad(load_image, tmp_path / "empty.png", match="empty.png is empty")
    bad(load_mask, tmp_path, match="is a directory", param="mask")
    bad(load_image, 42, match="must be a file path or a PIL image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated(tmp_path, fmt):
    data = io.BytesIO()
    noise_image(300, 300).save(data, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    msg = bad(load_image, path, match="could not be decoded|cannot be read|damaged")
    assert str(path) in msg


def test_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("just some text, not a picture\n")
    bad(load_image, tmp_path / "notes.png", match="is not a picture zimage reads; use PNG, JPEG or WebP")


def test_other_formats_named(tmp_path):
    msg = bad(load_image, save(stripes(), tmp_path / "a.bmp", "BMP"), match="is a BMP picture")
    assert "PNG, JPEG or WebP" in msg
    bad(load_image, save(stripes(), tmp_path / "a.tif", "TIFF"), match="is a TIFF picture")


def test_gif_and_animations_refused(tmp_path):
    bad(load_image, save(stripes(), tmp_path / "still.gif", "GIF"), match="is a GIF")
    frames = [stripes(), noise_image(512, 256)]
    bad(load_image, save(frames[0], tmp_path / "anim.gif", "GIF", save_all=True, append_images=frames[1:]),
        match="is a GIF")
    bad(load_image, save(frames[0], tmp_path / "anim.png", "PNG", save_all=True, append_images=frames[1:]),
        match="animated PNG \\(2 frames\\)")
    bad(load_image, save(frames[0], tmp_path / "anim.webp", "WEBP", save_all=True, append_images=frames[1:]),
        match="animated WEBP \\(2 frames\\)")
    gif = Image.open(tmp_path / "anim.gif")
    bad(load_image, gif, match="GIF")  # a PIL image from a GIF, too


def test_mpo_first_picture(tmp_path):
    path = save(stripes(), tmp_path / "camera.jpg", "MPO", save_all=True, append_images=[noise_image(512, 256)])
    img = load_image(path)
    assert img.source_size == (512, 256) and any("MPO" in n for n in img.notes)
    assert img.pixels.getpixel((256, 128))[1] > 200  # the stripes, not the noise


def test_too_many_bytes(tmp_path):
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:
        f.write(png_header_only(64, 64))
        f.truncate(ii.MAX_INPUT_BYTES + 1)  # sparse: no real 25 MiB written
    bad(load_image, path, match="25.0 MiB; at most 25 MiB")


def test_too_many_pixels(tmp_path):
    msg = bad(load_image, save(Image.new("RGB", (4097, 16)), tmp_path / "wide.png"), match="4097x16")
    assert "at most 4096 pixels per side" in msg
    bad(load_image, Image.new("RGB", (16, 5000)), match="16x5000")  # a PIL image too
    load_image(save(Image.new("RGB", (4096, 16)), tmp_path / "ok.png"))  # the bound itself is fine


@pytest.mark.parametrize("side,by", [(5000, "ours"), (10000, "pillow warning"), (100000, "pillow error")])
def test_decompression_bomb(tmp_path, side, by):
    """A tiny file whose header claims side x side pixels: refused from the header, nothing decoded.

    5000 (25 MP) is above zimage's bound and below Pillow's; 10000 (100 MP) makes Pillow warn, 100000 makes it
    raise: both read as errors, and neither Pillow's limit nor the warning filters are left changed."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(side, side))
    assert path.stat().st_size < 100
    limit, filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        msg = bad(load_image, path, match="too large to decode" if by != "ours" else f"{side}x{side}")
    assert "4096" in msg
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == limit and warnings.filters == filters


# ---------------------------------------------------------------- what a picture becomes


def test_png_roundtrip_and_hash(tmp_path):
    path = save(stripes(), tmp_path / "a.png")
    img = load_image(path)
    assert isinstance(img, InputImage) and img.pixels.mode == "RGB"
    assert (img.width, img.height) == img.source_size == (512, 256)
    assert img.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert img.source == str(path) and img.notes == ()
    assert np.array_equal(np.asarray(img.pixels), np.asarray(stripes()))


def test_pil_input_hash_is_of_pixels():
    a = load_image(stripes())
    assert a.source == "<PIL image>"
    assert a.sha256 == hashlib.sha256(b"RGB 512x256\n" + stripes().tobytes()).hexdigest()
    assert load_image(stripes()).sha256 == a.sha256  # deterministic
    assert load_image(noise_image(512, 256)).sha256 != a.sha256


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation(tmp_path, fmt):
    """Orientation 6 (rotate 90 degrees clockwise to display): stored 32x16 red|blue becomes 16x32 red over blue."""
    stored = Image.new("RGB", (64, 32), (255, 0, 0))
    stored.paste((0, 0, 255), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    img = load_image(save(stored, tmp_path / f"phone.{fmt.lower()}", fmt, exif=exif))
    assert img.source_size == (32, 64)
    top, bottom = img.pixels.getpixel((16, 8)), img.pixels.getpixel((16, 56))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_rgba_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # transparent red: white once composited
    rgba.paste((0, 0, 255, 255), (0, 0, 32, 64))  # opaque blue
    rgba.paste((0, 0, 0, 128), (32, 0, 64, 32))  # half-transparent black: mid grey
    img = load_image(save(rgba, tmp_path / "a.png"))
    assert img.pixels.mode == "RGB" and "transparency composited on white" in img.notes
    assert img.pixels.getpixel((0, 0)) == (0, 0, 255)
    assert img.pixels.getpixel((40, 48)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in img.pixels.getpixel((40, 8)))
    opaque = load_image(Image.new("RGBA", (16, 16), (1, 2, 3, 255)))
    assert opaque.notes == () and opaque.pixels.getpixel((0, 0)) == (1, 2, 3)


def test_la_and_palette_transparency_on_white(tmp_path):
    la = load_image(save(Image.new("LA", (16, 16), (0, 0)), tmp_path / "la.png"))
    assert la.pixels.getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([255, 0, 0] + [0, 255, 0] * 255)
    pal.paste(1, (8, 0, 16, 16))
    p = load_image(save(pal, tmp_path / "p.png", transparency=0))
    assert p.pixels.getpixel((0, 0)) == (255, 255, 255) and p.pixels.getpixel((12, 0)) == (0, 255, 0)


def test_palette_grayscale_cmyk_16bit_converted(tmp_path):
    pal = Image.new("P", (16, 16), 3)
    pal.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    p = load_image(save(pal, tmp_path / "p.png"))
    assert p.pixels.getpixel((0, 0)) == (10, 20, 30) and "converted from mode P to RGB" in p.notes
    g = load_image(save(Image.new("L", (16, 16), 77), tmp_path / "g.png"))
    assert g.pixels.mode == "RGB" and g.pixels.getpixel((3, 3)) == (77, 77, 77)
    c = load_image(save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg", "JPEG"))
    r, gg, b = c.pixels.getpixel((8, 8))
    assert r > 240 and gg < 15 and b < 15
    sixteen = Image.fromarray(np.full((16, 16), 32768, np.uint16))
    s = load_image(save(sixteen, tmp_path / "s16.png"))
    assert s.pixels.getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped to 255


def test_webp_and_jpeg_load(tmp_path):
    for fmt in ("WEBP", "JPEG"):
        img = load_image(save(stripes(), tmp_path / f"a.{fmt.lower()}", fmt, quality=95))
        assert img.source_size == (512, 256)
        assert img.pixels.getpixel((256, 128))[1] > 200


def test_masks(tmp_path):
    stroke = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # a transparent canvas with an opaque white stroke
    stroke.paste((255, 255, 255, 255), (8, 8, 40, 40))
    m = load_mask(save(stroke, tmp_path / "stroke.png"))
    assert m.pixels.mode == "L" and m.pixels.getpixel((0, 0)) == 0 and m.pixels.getpixel((16, 16)) == 255
    assert any("composited on black" in n for n in m.notes)
    rgb = load_mask(Image.new("RGB", (16, 16), (255, 255, 255)))
    assert rgb.pixels.mode == "L" and rgb.pixels.getpixel((0, 0)) == 255
    assert rgb.sha256 == hashlib.sha256(b"L 16x16\n" + b"\xff" * 256).hexdigest()


# ---------------------------------------------------------------- sizes


def test_default_size_rounds_down_by_cropping(tmp_path):
    src = noise_image(1030, 521)
    img, mask = prepare_inputs(save(src, tmp_path / "odd.png"))
    assert mask is None and (img.width, img.height) == (1024, 512) and img.source_size == (1030, 521)
    # the centre, unchanged: 3 px off the left, 3 off the right, 4 off the top, 5 off the bottom
    assert np.array_equal(np.asarray(img.pixels), np.asarray(src)[4:516, 3:1027])
    assert any("1030x521" in n and "1024x512" in n for n in img.notes)


def test_default_size_exact_is_untouched(tmp_path):
    src = noise_image(512, 256)
    img, _ = prepare_inputs(src)
    assert img.notes == () and np.array_equal(np.asarray(img.pixels), np.asarray(src))


def test_default_size_out_of_range():
    msg = bad(prepare_inputs, Image.new("RGB", (2100, 1024)), match="2100x1024", param="image")
    assert "resize fit, crop or stretch" in msg and "256..2048" in msg
    bad(prepare_inputs, Image.new("RGB", (200, 512)), match="200x512")


def test_requested_size_needs_a_mode():
    msg = bad(prepare_inputs, stripes(), width=256, height=256, match="512x256 but the requested size is 256x256",
              param="resize")
    assert "fit, crop or stretch" in msg
    bad(prepare_inputs, stripes(), width=256, match="both width and height")
    bad(prepare_inputs, stripes(), width=256, height=256, resize="zoom", match="resize must be one of")
    bad(prepare_inputs, stripes(), width=250, height=256, resize="crop", match="multiple of 16")
    img, _ = prepare_inputs(stripes(), width=512, height=256)  # the same size needs no mode
    assert img.notes == ()


def test_resize_modes():
    crop, _ = prepare_inputs(stripes(), width=256, height=256, resize="crop")
    assert np.array_equal(np.asarray(crop.pixels), np.asarray(stripes())[:, 128:384])  # the centre: all green
    stretch, _ = prepare_inputs(stripes(), width=256, height=256, resize="stretch")
    s = np.asarray(stretch.pixels)
    assert s.shape == (256, 256, 3) and s[128, 10, 0] > 240 and s[128, 128, 1] > 240 and s[128, 250, 2] > 240
    fit, _ = prepare_inputs(stripes(), width=512, height=512, resize="fit")
    f = np.asarray(fit.pixels)
    assert np.array_equal(f[128:384], np.asarray(stripes()))  # the whole picture, centred
    assert np.array_equal(f[:128], np.repeat(f[128:129], 128, axis=0))  # padded by repeating the edge rows
    assert np.array_equal(f[384:], np.repeat(f[383:384], 128, axis=0))
    assert any("(fit)" in n for n in fit.notes)
    down, _ = prepare_inputs(noise_image(1000, 500), width=512, height=256, resize="fit")
    assert down.pixels.size == (512, 256)


def test_mask_follows_the_image(tmp_path):
    mask = Image.new("L", (1030, 521), 0)
    mask.paste(255, (3 + 64, 4 + 32, 3 + 128, 4 + 96))
    img, m = prepare_inputs(noise_image(1030, 521), mask)
    assert m.pixels.size == (1024, 512)
    arr = np.asarray(m.pixels)
    assert arr[32:96, 64:128].min() == 255 and arr.sum() == 255 * 64 * 64  # the same crop as the picture


def test_mask_size_mismatch(tmp_path):
    msg = bad(prepare_inputs, stripes(), Image.new("L", (256, 256), 255), match="mask <PIL image> is 256x256 but "
              "the image is 512x256", param="mask")
    assert "resize mode" in msg
    img, m = prepare_inputs(stripes(), Image.new("L", (256, 128), 255), resize="stretch")
    assert m.pixels.size == (512, 256) and any("mask" in n and "resized" in n for n in m.notes)
    _, m = prepare_inputs(stripes(), Image.new("L", (512, 256), 255), width=512, height=512, resize="fit")
    a = np.asarray(m.pixels)
    assert a[:128].max() == 0 and a[384:].max() == 0 and a[128:384].min() == 255  # padding is kept, not repainted


def test_all_black_mask():
    bad(prepare_inputs, stripes(), Image.new("L", (512, 256), 0), match="all black: nothing to repaint",
        param="mask")
    bad(prepare_inputs, stripes(), Image.new("L", (512, 256), 127), match="nothing to repaint")  # < 0.5
    speck = Image.new("L", (512, 256), 0)
    speck.putpixel((3, 3), 255)  # white, but between the pixels the latent grid reads
    bad(prepare_inputs, stripes(), speck, match="none at the top-left pixel of an 8x8 cell")
    speck.putpixel((8, 8), 255)
    prepare_inputs(stripes(), speck)


def test_mask_blur_as_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    mask = Image.new("L", (512, 256), 0)
    mask.paste(255, (100, 50, 300, 200))
    _, m = prepare_inputs(stripes(), mask, mask_blur=9)
    assert np.array_equal(np.asarray(m.pixels), np.asarray(VaeImageProcessor.blur(mask, 9)))
    assert 0 < np.asarray(m.pixels)[125, 100] < 255 and "mask blurred by 9 px" in m.notes
    for value in (-1, 1.5, True, 1000, "4"):
        bad(prepare_inputs, stripes(), mask, mask_blur=value, match="mask blur must be", param="mask_blur")


# ---------------------------------------------------------------- outpainting


def test_outpaint_right():
    src = noise_image(256, 256)
    img, m = outpaint(src, 0, 0, 256, 0)
    p, a = np.asarray(img.pixels), np.asarray(m.pixels)
    assert img.pixels.size == m.pixels.size == (512, 256)
    assert np.array_equal(p[:, :256], np.asarray(src))
    assert np.array_equal(p[:, 256:], np.repeat(p[:, 255:256], 256, axis=1))  # edge pixels repeated
    assert a[:, :256].max() == 0 and a[:, 256:].min() == 255
    assert m.source == "<outpaint 0,0,256,0>" and img.sha256 == load_image(src).sha256
    again, again_mask = prepare_inputs(img, m)  # ready for the model as it is
    assert again.pixels.size == (512, 256) and np.array_equal(np.asarray(again_mask.pixels), a)


def test_outpaint_overlap_and_all_sides():
    img, m = outpaint(noise_image(256, 256), 16, 32, 48, 0, overlap=8)
    a = np.asarray(m.pixels)
    assert img.pixels.size == (320, 288)
    kept = a == 0
    ys, xs = np.nonzero(kept)
    # the picture sits at x 16..271, y 32..287; the overlap eats 8 px on the padded left, top and right sides
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (24, 263, 40, 287)


def test_outpaint_limits():
    bad(outpaint, Image.new("RGB", (2048, 256)), 0, 0, 16, 0, match="2064x256 canvas.*between 256 and 2048",
        param="outpaint")
    bad(outpaint, Image.new("RGB", (256, 256)), 0, 0, 10, 0, match="266x256 canvas.*multiple of 16")
    bad(outpaint, Image.new("RGB", (256, 256)), 0, 0, 0, 0, match="at least one > 0")
    bad(outpaint, Image.new("RGB", (256, 256)), -16, 0, 32, 0, match="margins")
    bad(outpaint, Image.new("RGB", (256, 256)), 0, 0, 256, 0, overlap=200, match="overlap")


def test_expand_to_centres():
    src = noise_image(256, 256)
    img, m = expand_to(src, 512, 384)
    assert np.array_equal(np.asarray(img.pixels)[64:320, 128:384], np.asarray(src))
    a = np.asarray(m.pixels)
    assert a[64:320, 128:384].max() == 0 and a.sum() == 255 * (512 * 384 - 256 * 256)
    bad(expand_to, src, 128, 512, match="at least the image's size 256x256", param="expand_to")
    bad(expand_to, src, 256, 256, match="larger in one side")
    bad(expand_to, src, 4096, 256, match="4096x256 canvas")


def test_parse_margins():
    assert parse_margins("0,16, 32,48") == (0, 16, 32, 48)
    for text in ("1,2,3", "a,b,c,d", "-1,0,0,0", "1.5,0,0,0"):
        bad(parse_margins, text, match="LEFT,TOP,RIGHT,BOTTOM", param="outpaint")


# ---------------------------------------------------------------- tensors, against diffusers' processor


def test_image_tensor_as_diffusers():
    import torch
    from diffusers.image_processor import VaeImageProcessor

    pil = noise_image(512, 256)
    ours = image_to_tensor(pil)
    ref = VaeImageProcessor(vae_scale_factor=16).preprocess(pil)
    assert ours.shape == ref.shape == (1, 3, 256, 512) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)
    assert ours.stride() == ref.stride()  # the same (channels_last) layout: convolutions round by layout
    assert ours.min() >= -1 and ours.max() <= 1


def test_mask_tensor_as_diffusers():
    import torch
    from diffusers.image_processor import VaeImageProcessor

    mask = Image.new("L", (512, 256), 0)
    mask.paste(255, (100, 50, 300, 200))
    _, m = prepare_inputs(stripes(), mask, mask_blur=12)  # grey edges, binarised below
    processor = VaeImageProcessor(vae_scale_factor=16, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True)
    ours = mask_to_tensor(m.pixels)
    ref = processor.preprocess(m.pixels, height=256, width=512)
    assert ours.shape == ref.shape == (1, 1, 256, 512)
    assert torch.equal(ours, ref) and set(ours.unique().tolist()) == {0.0, 1.0}
