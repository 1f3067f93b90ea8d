"""Draws the small example concept the repo ships (examples/toy/): a red toy robot on varied
backgrounds, at varied sizes and positions. No photos can be downloaded here, so the example is
drawn; the training pipeline treats it like any photo set. Needs Pillow.

    python tools/make_example_images.py
"""

import os
import random

from PIL import Image, ImageDraw

OUT = os.path.join(os.path.dirname(__file__), "..", "examples", "toy")


def toy(draw, cx, cy, s):
    # body, head, eyes, antenna, legs
    draw.rounded_rectangle([cx - s, cy - s // 2, cx + s, cy + s], radius=s // 5, fill=(200, 30, 40))
    draw.rectangle([cx - s // 2, cy - s * 3 // 2, cx + s // 2, cy - s // 2], fill=(220, 60, 60))
    for ex in (cx - s // 4, cx + s // 4):
        draw.ellipse([ex - s // 10, cy - s * 6 // 5, ex + s // 10, cy - s], fill=(250, 240, 80))
    draw.line([cx, cy - s * 3 // 2, cx, cy - s * 2], fill=(60, 60, 60), width=max(1, s // 12))
    draw.ellipse([cx - s // 8, cy - s * 9 // 4, cx + s // 8, cy - s * 2], fill=(250, 240, 80))
    for lx in (cx - s // 2, cx + s // 3):
        draw.rectangle([lx, cy + s, lx + s // 5, cy + s * 3 // 2], fill=(90, 20, 25))


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = random.Random(3)
    backgrounds = [(235, 225, 200), (170, 200, 230), (200, 230, 190), (120, 110, 100)]
    sizes = [(160, 160), (192, 160), (160, 176), (176, 176)]
    for i, (bg, (w, h)) in enumerate(zip(backgrounds, sizes)):
        img = Image.new("RGB", (w, h), bg)
        d = ImageDraw.Draw(img)
        d.rectangle([0, h * 3 // 4, w, h], fill=tuple(max(0, c - 40) for c in bg))  # a table
        toy(d, w // 2 + rng.randint(-15, 15), h // 2 + rng.randint(-5, 10), rng.randint(26, 34))
        name = os.path.join(OUT, f"toy-{i}.{'jpg' if i % 2 else 'png'}")
        img.save(name, quality=92) if i % 2 else img.save(name)
        print(name)


if __name__ == "__main__":
    main()
