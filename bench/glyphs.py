"""Write a second real-image class-folder dataset: printed lowercase letters in the fonts that ship with matplotlib.

The ten classes are letters that look alike in print (a c e o u n h b d q). Each sample draws one in a random one of
matplotlib's 25 text fonts (DejaVu Sans, Serif and Mono, STIX and Computer Modern, in their weights and slants), at a
random size, place and tilt, between two random neighbours as in a line of text (their edges show at the sides), in
a random ink on a random paper colour, then blurs it a little and adds sensor noise.
The shapes are real type designs, unlike photo-patches' textures, so the two datasets ask different things of a
model.

    python bench/glyphs.py data/glyphs --per-class 1000 --size 28
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from photo_patches import dataset_main, write_classes
from PIL import Image, ImageDraw, ImageFilter, ImageFont

LETTERS = "aceounhbdq"
FONT_FILES = [
    *(f"DejaVu{family}{style}.ttf" for family in ("Sans", "Serif", "SansMono") for style in ("", "-Bold")),
    "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf", "cmb10.ttf",
]  # fmt: skip
CANVAS = 64  # drawn large, then shrunk: anti-aliased edges like a scan


@cache
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def glyph(letter: str, size: int, rng: np.random.Generator) -> Image.Image:
    """`letter` cut from a line of print: its neighbours' edges show on either side, as in a real crop."""
    paper_rgb = rng.integers(100, 256, 3)
    ink_rgb = (paper_rgb - rng.integers(45, 101, 3)).clip(0, 255)  # darker than the paper, by a varying amount
    paper, ink = tuple(int(c) for c in paper_rgb), tuple(int(c) for c in ink_rgb)
    canvas = Image.new("RGB", (CANVAS, CANVAS), paper)
    points = int(rng.integers(28, 50))
    face = font(FONT_FILES[rng.integers(len(FONT_FILES))], points)
    neighbours = rng.choice(list(LETTERS), 2)
    x, y = CANVAS / 2 + rng.uniform(-5, 5, 2)
    gap = points * rng.uniform(0.55, 0.75)  # letter pitch: the neighbours are cut by the frame, not the letter
    draw = ImageDraw.Draw(canvas)
    for dx, text in ((-gap, neighbours[0]), (0.0, letter), (gap, neighbours[1])):
        draw.text((x + dx, y), text, fill=ink, font=face, anchor="mm")
    canvas = canvas.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BILINEAR, fillcolor=paper)
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5))).resize((size, size), Image.Resampling.BOX)
    noisy = np.asarray(canvas, np.float32) + rng.normal(0, 10, (size, size, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def write(out: Path, per_class: int, size: int, seed: int = 0) -> int:
    """Write the dataset into `out` (replaced whole, through a temporary folder); returns the number of images."""
    makers = {letter: (lambda rng, letter=letter: glyph(letter, size, rng)) for letter in LETTERS}
    return write_classes(out, makers, per_class, seed)


if __name__ == "__main__":
    dataset_main(write, __doc__, per_class=1000)
