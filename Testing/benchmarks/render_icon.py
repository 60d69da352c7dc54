"""Draw the module icon (SSALesionSeg/Resources/Icons/SSALesionSeg.png, 128x128).

Two lungs in an axial chest outline with a red ground-glass patch and a green
consolidation, in the segment colours the module uses.

    python Testing/benchmarks/render_icon.py [--out PATH]
"""

import argparse
import os

import numpy as np
from PIL import Image, ImageFilter

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_OUT = os.path.join(REPO, "SSALesionSeg", "Resources", "Icons", "SSALesionSeg.png")
SIZE = 128
SUPERSAMPLE = 4


def ellipse(shape, cy, cx, ry, rx):
    y, x = np.ogrid[: shape[0], : shape[1]]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def draw():
    n = SIZE * SUPERSAMPLE
    shape = (n, n)
    s = n / 128.0
    rgba = np.zeros((n, n, 4), np.float32)

    def paint(mask, color, alpha=1.0):
        rgba[mask, :3] = np.array(color, np.float32) * alpha + rgba[mask, :3] * (1 - alpha)
        rgba[mask, 3] = np.maximum(rgba[mask, 3], 255 * alpha)

    body = ellipse(shape, 66 * s, 64 * s, 50 * s, 61 * s)
    paint(body, (70, 74, 82))
    paint(ellipse(shape, 66 * s, 64 * s, 46 * s, 57 * s), (150, 150, 150))
    right = ellipse(shape, 62 * s, 38 * s, 36 * s, 22 * s)
    left = ellipse(shape, 62 * s, 90 * s, 36 * s, 21 * s)
    paint(right | left, (28, 30, 36))
    paint(ellipse(shape, 92 * s, 64 * s, 12 * s, 10 * s), (190, 190, 190))  # spine
    ggo = ellipse(shape, 52 * s, 34 * s, 15 * s, 12 * s) & right
    consolidation = ellipse(shape, 78 * s, 94 * s, 11 * s, 9 * s) & left
    paint(ggo, (255, 0, 0), 0.85)
    paint(consolidation, (0, 204, 0), 0.95)

    image = Image.fromarray(rgba.clip(0, 255).astype(np.uint8), "RGBA")
    image = image.filter(ImageFilter.GaussianBlur(SUPERSAMPLE / 3))
    return image.resize((SIZE, SIZE), Image.LANCZOS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    draw().save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
