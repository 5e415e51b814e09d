"""Draw examples/sample.jpg (a red kite over green hills under a blue sky) and imgserve/web/static/favicon.ico.

    .venv/bin/python examples/make_sample.py

Both are drawn from scratch with Pillow, so the repository holds no photo of anyone's; running it again gives
the same pictures.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 224  # ResNet50's input size: the server resizes nothing


def sample() -> Image.Image:
    """Sky, two hills, a sun and a kite on its string."""
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    for y in range(SIZE):  # the sky, lighter towards the horizon
        draw.line([(0, y), (SIZE, y)], fill=(90 + y // 3, 150 + y // 4, 235))
    draw.ellipse([160, 18, 204, 62], fill=(255, 214, 70))
    draw.ellipse([-80, 140, 160, 330], fill=(60, 140, 60))
    draw.ellipse([90, 150, 330, 330], fill=(40, 115, 50))
    kite = [(70, 40), (98, 70), (70, 118), (42, 70)]
    draw.polygon(kite, fill=(210, 40, 40), outline=(120, 20, 20))
    draw.line([(70, 40), (70, 118)], fill=(120, 20, 20), width=2)
    draw.line([(42, 70), (98, 70)], fill=(120, 20, 20), width=2)
    draw.line([(70, 118), (95, 150), (120, 190)], fill=(60, 60, 60), width=1)
    return image


def favicon() -> Image.Image:
    """The upload page's icon: the kite alone."""
    icon = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    ImageDraw.Draw(icon).polygon([(16, 1), (29, 13), (16, 31), (3, 13)], fill=(210, 40, 40), outline=(120, 20, 20))
    return icon


def main() -> None:
    sample().save(HERE / "sample.jpg", "JPEG", quality=85)
    favicon().save(HERE.parent / "imgserve" / "web" / "static" / "favicon.ico", sizes=[(32, 32), (16, 16)])


if __name__ == "__main__":
    main()
