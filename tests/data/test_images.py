"""Decoding: corrupt files, EXIF orientation, alpha, resize/crop geometry and value range."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile

from simpletuner.data.images import CorruptImageError, load_image_tensor


def _noisy_png(path: Path, size: tuple[int, int]) -> Path:
    """A PNG with random pixels, so compression cannot shrink it to a few bytes."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    Image.fromarray(pixels.numpy(), "RGB").save(path)
    return path


def test_truncated_png_raises_naming_file(tmp_path: Path) -> None:
    path = _noisy_png(tmp_path / "cut.png", (64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with Image.open(path) as image:  # the header is still valid: only decoding finds the damage
        assert image.size == (64, 64)
    with pytest.raises(CorruptImageError, match=r"cut\.png"):
        load_image_tensor(path, (64, 64))


def test_not_an_image_raises(tmp_path: Path) -> None:
    path = tmp_path / "fake.jpg"
    path.write_bytes(b"hello")
    with pytest.raises(CorruptImageError, match=r"fake\.jpg"):
        load_image_tensor(path, (8, 8))


def test_shape_range_and_exact_values(tmp_path: Path) -> None:
    path = tmp_path / "two_tone.png"
    image = Image.new("RGB", (4, 2), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 2, 2))  # left half black, right half white
    image.save(path)
    tensor = load_image_tensor(path, (4, 2))
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 2, 4)
    expected = torch.tensor([[-1.0, -1.0, 1.0, 1.0]] * 2).expand(3, 2, 4)
    assert torch.equal(tensor, expected)


def test_resize_covers_then_center_crops(tmp_path: Path) -> None:
    # 60x20: left third red, middle green, right third blue. Target 16x16 covers at 48x16, and the
    # centre crop keeps the middle 16 columns: all green.
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 255, 0), (20, 0, 40, 20))
    image.paste((0, 0, 255), (40, 0, 60, 20))
    path = tmp_path / "stripes.png"
    image.save(path)
    tensor = load_image_tensor(path, (16, 16))
    assert tensor.shape == (3, 16, 16)
    assert torch.allclose(tensor[:, :, 4:12], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 16, 8), atol=0.05)
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0


def test_small_image_is_upscaled(tmp_path: Path) -> None:
    path = tmp_path / "tiny.png"
    Image.new("RGB", (3, 2), (255, 0, 0)).save(path)
    tensor = load_image_tensor(path, (48, 32))
    assert tensor.shape == (3, 32, 48)
    assert torch.allclose(tensor[0], torch.ones(32, 48)) and torch.allclose(tensor[1], -torch.ones(32, 48))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 40x20 with a red left half; orientation 6 = rotate 90 degrees clockwise for display,
    # which gives a 20x40 portrait with the red half on top.
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif.tobytes(), quality=100)
    tensor = load_image_tensor(path, (20, 40))
    assert tensor.shape == (3, 40, 20)
    top_red = tensor[0, :16].mean() - tensor[2, :16].mean()
    bottom_blue = tensor[2, 24:].mean() - tensor[0, 24:].mean()
    assert top_red > 1.8 and bottom_blue > 1.8


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "cutout.png"
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    image.putpixel((0, 0), (255, 0, 0, 255))
    image.save(path)
    tensor = load_image_tensor(path, (4, 4))
    assert torch.equal(tensor[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(tensor[:, 3, 3], torch.tensor([1.0, 1.0, 1.0]))


def test_sixteen_bit_greyscale_is_not_clipped_white(tmp_path: Path) -> None:
    path = tmp_path / "grey16.png"
    Image.new("I;16", (4, 4), 32896).save(path)  # 32896 / 257 = 128
    tensor = load_image_tensor(path, (4, 4))
    assert torch.allclose(tensor, torch.full((3, 4, 4), 128 / 127.5 - 1), atol=1e-6)
