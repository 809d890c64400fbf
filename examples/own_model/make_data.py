"""Write data.npz: a small image dataset of its own, to study a model on data sgdnoise does
not know. Deterministic (the same file for the same arguments).

Each 1x16x16 image holds one noisy shape, at a random place, length and brightness: class 0
a horizontal bar, 1 a vertical bar, 2 a plus, 3 an X. All four look the same mirrored, so
the crop-and-flip augmentation keeps their labels.

    python make_data.py [--out data.npz] [--train 800] [--test 400] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np

SIZE, CLASSES = 16, 4


def shape_image(label: int, rng: np.random.Generator) -> np.ndarray:
    img = np.zeros((SIZE, SIZE), dtype=np.float32)
    half = int(rng.integers(3, 6))  # half the stroke length
    r, c = (int(v) for v in rng.integers(half, SIZE - half, size=2))
    span = np.arange(-half, half + 1)
    if label in (0, 2):  # horizontal stroke
        img[r, c + span] = 1
    if label in (1, 2):  # vertical stroke
        img[r + span, c] = 1
    if label == 3:  # both diagonals
        img[r + span, c + span] = 1
        img[r + span, c - span] = 1
    return img * rng.uniform(0.5, 1.5)


def make(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, CLASSES, size=n)
    x = np.stack([shape_image(int(label), rng) for label in y])
    x += rng.normal(0, 0.3, size=x.shape).astype(np.float32)
    return x[:, None].astype(np.float32), y.astype(np.int64)  # (N, 1, 16, 16), (N,)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data.npz")
    p.add_argument("--train", type=int, default=800)
    p.add_argument("--test", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    train_x, train_y = make(args.train, rng)
    test_x, test_y = make(args.test, rng)
    np.savez(args.out, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    print(f"wrote {args.out}: train {train_x.shape}, test {test_x.shape}, {CLASSES} classes")


if __name__ == "__main__":
    main()
