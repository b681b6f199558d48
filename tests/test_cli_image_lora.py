"""The CLI with image inputs and LoRAs on the tiny model: the PNGs record how they were made (input hashes,
strength, mask blur, LoRA hashes as AUTOMATIC1111 writes them), and --from-png remakes them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from zimage.cli.main import main
from zimage.io.png import read_metadata

FAST = ("--model", "tiny-random", "--device", "cpu", "--steps", "2", "--seed", "4")


@pytest.fixture
def picture(tmp_path):
    y, x = np.mgrid[0:256, 0:288]
    arr = np.stack([x % 256, y, (x + y) % 256], axis=-1).astype(np.uint8)
    path = tmp_path / "in.png"
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def mask(tmp_path):
    m = Image.new("L", (288, 256), 0)
    m.paste(255, (64, 64, 160, 160))
    path = tmp_path / "mask.png"
    m.save(path)
    return path


@pytest.fixture
def lora(tmp_path, transformer_shapes):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "lora"))
    try:
        from lora_writers import F, random_lora, write_kohya
    finally:
        sys.path.pop(0)
    factors = {m: F(f.down * 0.25, f.up, f.alpha) for m, f in random_lora(transformer_shapes, seed=7).items()}
    return write_kohya(tmp_path / "style.safetensors", factors)


@pytest.fixture(scope="session")
def transformer_shapes(tiny_folder):
    from zimage.weights.lora import linear_shapes
    from zimage.weights.networks import build_transformer

    return linear_shapes(build_transformer(tiny_folder).module)


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_img2img_keeps_the_pictures_size_and_records_it(tmp_path, picture, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", "-p", "a fox", "--image", str(picture), "--strength", "0.5", *FAST, "-o", str(out)]) == 0
    meta = read_metadata(out)
    assert Image.open(out).size == (288, 256) and (meta.width, meta.height) == (288, 256)
    import hashlib

    assert meta.image["sha256"] == hashlib.sha256(picture.read_bytes()).hexdigest() and meta.strength == 0.5
    assert "Denoising strength: 0.5" in Image.open(out).text["parameters"]
    again = tmp_path / "b.png"
    assert main(["generate", "--from-png", str(out), "--image", str(picture), "--device", "cpu", "-o",
                 str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(out))
    assert main(["generate", "--from-png", str(out), "--device", "cpu", "-o", str(tmp_path / "c.png")]) == 2
    assert "give it with --image" in capsys.readouterr().err


def test_inpainting_keeps_the_unmasked_latents_and_records_the_mask(tmp_path, picture, mask):
    out = tmp_path / "a.png"
    assert main(["generate", "-p", "a cat", "--image", str(picture), "--mask", str(mask), "--mask-blur", "4", *FAST,
                 "-o", str(out)]) == 0
    meta = read_metadata(out)
    assert meta.strength == 1.0 and meta.mask["blur"] == 4 and len(meta.mask["sha256"]) == 64
    assert "Mask blur: 4" in Image.open(out).text["parameters"]
    again = tmp_path / "b.png"
    assert main(["generate", "--from-png", str(out), "--image", str(picture), "--mask", str(mask), "--device", "cpu",
                 "-o", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(out))


def test_outpaint_and_expand_to_grow_the_canvas(tmp_path, picture):
    out = tmp_path / "wide.png"
    assert main(["generate", "-p", "a beach", "--image", str(picture), "--outpaint", "0,0,32,16", *FAST,
                 "-o", str(out)]) == 0
    assert Image.open(out).size == (320, 272)
    out2 = tmp_path / "big.png"
    assert main(["generate", "-p", "a beach", "--image", str(picture), "--expand-to", "384x256", *FAST,
                 "-o", str(out2)]) == 0
    assert Image.open(out2).size == (384, 256)


def test_lora_is_recorded_as_a1111_writes_it_and_reapplied_from_the_png(tmp_path, lora, capsys):
    from zimage.weights.lora import read_lora

    plain, styled = tmp_path / "plain.png", tmp_path / "styled.png"
    base = ["generate", "-p", "a lighthouse", *FAST, "--width", "256", "--height", "256"]
    assert main([*base, "-o", str(plain)]) == 0
    assert main([*base, "--lora", f"{lora}:0.8", "-o", str(styled)]) == 0
    short = read_lora(lora).short_hash
    assert f'Lora hashes: "style: {short}"' in Image.open(styled).text["parameters"]
    meta = read_metadata(styled)
    assert meta.loras[0]["file"] == str(lora) and meta.loras[0]["scale"] == 0.8
    assert np.abs(pixels(styled) - pixels(plain)).max() > 10  # the LoRA changed the image
    capsys.readouterr()
    assert main(["show", str(styled)]) == 0
    assert f"style: {short}" in capsys.readouterr().out
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(styled), "--device", "cpu", "-o", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(styled))
    moved = tmp_path / "moved.safetensors"
    lora.rename(moved)
    assert main(["generate", "--from-png", str(styled), "--device", "cpu", "-o", str(tmp_path / "x.png")]) == 2
    assert "was made with LoRA 'style'" in capsys.readouterr().err


def test_lora_inspect(lora, capsys):
    from zimage.weights.lora import read_lora

    assert main(["lora", "inspect", str(lora)]) == 0
    out = capsys.readouterr().out
    assert "kohya layout" in out and read_lora(lora).short_hash in out and "layers.0-1" in out
    assert main(["lora", "inspect", "--json", str(lora)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "kohya" and info["networks"]["transformer"]["ranks"] == [4]
