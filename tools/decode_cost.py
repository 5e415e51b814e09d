"""CPU time and peak memory of preparing one upload, the old way beside the new, each in a fresh process.

    python -m tools.decode_cost

For the castle photo (../shared/images, or a generated 800x480 JPEG), a 48-megapixel JPEG (8000x6000),
baseline and progressive, a 4096x4096 RGBA PNG and a 6300x6300 solid-colour PNG (about 130 KB):
`helpers.prepare_image` with the default limits, and the preparation as it was before decoding had a
memory budget (everything at full size; kept here only as the baseline). Peak memory is the process's
VmHWM minus its VmRSS just before the call.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

PROJECT = Path(__file__).resolve().parent.parent
CASTLE = PROJECT.parent / "shared" / "images" / "castle_image.jpg"


def old_prepare(data: bytes) -> np.ndarray:
    """The baseline: the preparation before MAX_DECODE_BYTES, reducing and the budget (all at full size)."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (224, 224))
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("LA", "PA", "RGBA", "P"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))


def measure_one(path: Path, way: str) -> dict:
    """In this (fresh) process: prepare the file once, the old or the new way."""
    from imgserve.imaging.prepare import ImageError, prepare_image

    data = path.read_bytes()
    prepare = old_prepare if way == "old" else prepare_image
    for fmt in ("JPEG", "PNG"):  # first calls load Pillow's plugins: not the upload's cost
        warm = io.BytesIO()
        Image.new("RGB", (8, 8)).save(warm, fmt)
        prepare(warm.getvalue())
    before_rss, started = _status_kb("VmRSS"), time.process_time()
    try:
        prepare(data)
        outcome = "prepared"
    except ImageError as exc:
        outcome = f"refused: {str(exc)[:70]}..."
    cpu = time.process_time() - started
    return {"cpu_ms": cpu * 1000, "peak_mb": (_status_kb("VmHWM") - before_rss) / 1024, "outcome": outcome}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def sample_files(folder: Path) -> dict[str, Path]:
    """The three uploads, written to `folder`."""
    files = {"castle photo": CASTLE}
    if not CASTLE.exists():
        files["castle photo"] = folder / "castle.jpg"
        Image.radial_gradient("L").resize((800, 480)).convert("RGB").save(files["castle photo"], "JPEG")
    files["48 MP JPEG (8000x6000)"] = folder / "phone.jpg"
    files["48 MP progressive JPEG"] = folder / "progressive.jpg"
    gradient = Image.linear_gradient("L").resize((8000, 6000))
    photo = Image.merge("RGB", [gradient, gradient.transpose(Image.Transpose.ROTATE_180), gradient])
    photo.save(files["48 MP JPEG (8000x6000)"], "JPEG", quality=85)
    photo.save(files["48 MP progressive JPEG"], "JPEG", quality=85, progressive=True)
    files["4096x4096 RGBA PNG"] = folder / "rgba.png"
    Image.merge("RGBA", [gradient.resize((4096, 4096))] * 4).save(files["4096x4096 RGBA PNG"], "PNG")
    files["6300x6300 PNG, one colour"] = folder / "solid.png"
    Image.new("RGB", (6300, 6300), (10, 120, 200)).save(files["6300x6300 PNG, one colour"], "PNG")
    return files


def run() -> list[dict]:
    """Every file, both ways, each in its own process: a row per measurement."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in sample_files(Path(tmp)).items():
            for way in ("old", "new"):
                args = [sys.executable, "-m", "tools.decode_cost", "--one", str(path), way]
                result = json.loads(subprocess.run(args, cwd=PROJECT, capture_output=True, check=True).stdout)
                rows.append({"image": name, "bytes": path.stat().st_size, "way": way, **result})
    return rows


def describe(row: dict) -> str:
    return (
        f"{row['image']:28s} {row['bytes']:>10,} B  {row['way']:3s}: {row['cpu_ms']:7.1f} ms CPU, "
        f"{row['peak_mb']:7.1f} MB peak   {row['outcome']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", nargs=2, metavar=("FILE", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(Path(args.one[0]), args.one[1])))
        return 0
    for row in run():
        print(describe(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
