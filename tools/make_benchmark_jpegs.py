"""A benchmark set of ImageNet-sized JPEGs, for `tools/benchmark.py --mode data` where there is no ImageNet.

    python tools/make_benchmark_jpegs.py --output_dir jpegs            # 1,000 files, 46 MB, ~20 s on 2 cores
    python tools/benchmark.py --mode data --data_path jpegs --model mae_vit_base_patch16 --num_workers 1

The source is a real photograph that a dependency ships, matplotlib's `sample_data/grace_hopper.jpg` (512 x 600,
public domain). Each file is a random crop of it (10-100% of its area), flipped or not, with a random per-channel
gain (0.8-1.2), rescaled to ImageNet's size spread and saved at JPEG quality 75-95 (4:2:0 chroma, as most
ImageNet files):
- shape: landscape 3:4 (500 x 375) in 60% of files, portrait (375 x 500) in 15%, and the rest 500 x 333, 1:1
  or 16:9 crops; the long side is 500 px in 80% of files (ImageNet's mode), else uniform in 300-800 px;
- mean size 487 x 406 px with the default seed (ImageNet's training images: about 400 x 350 on average, most
  at 500 on the long side).
Decoding time depends mostly on the pixel count and the quality, which this spread follows; the content is one
photograph's, so entropy-coding costs are those of a typical portrait photo, not ImageNet's mix. The folder is
an ImageFolder (`train/photos/*.jpg`), which both our and the official loader read.
"""
import argparse
import os
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ((4 / 3, 0.60), (3 / 4, 0.15), (3 / 2, 0.10), (1.0, 0.10), (16 / 9, 0.05))  # (width / height, share)


def source_photo() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def draw_size(rng: np.random.Generator) -> tuple[int, int]:
    aspect = rng.choice([a for a, _ in SHAPES], p=[p for _, p in SHAPES])
    long_side = 500 if rng.random() < 0.8 else int(rng.integers(300, 801))
    return (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)


def write_jpeg(job: tuple[Path, int]) -> tuple[int, int]:
    path, seed = job
    rng = np.random.default_rng(seed)
    with Image.open(source_photo()) as photo:
        photo = photo.convert("RGB")
    width, height = draw_size(rng)
    # a crop of 10-100% of the photo's area with the target's aspect ratio (clipped to the photo)
    area = rng.uniform(0.1, 1.0) * photo.width * photo.height
    crop_w = min(photo.width, round((area * width / height) ** 0.5))
    crop_h = min(photo.height, round(crop_w * height / width))
    left, top = int(rng.integers(0, photo.width - crop_w + 1)), int(rng.integers(0, photo.height - crop_h + 1))
    image = photo.resize((width, height), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float32) * rng.uniform(0.8, 1.2, size=3)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=int(rng.integers(75, 96)))
    return width, height


def make_set(output_dir: Path, count: int = 1000, seed: int = 0) -> Path:
    """`count` JPEGs in output_dir/train/photos (skipped if already there); returns output_dir."""
    folder = Path(output_dir) / "train" / "photos"
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"{i:05d}.jpg", seed * 1_000_003 + i) for i in range(count)]
    if count < 64:
        sizes = [write_jpeg(job) for job in jobs]
    else:
        with Pool(min(os.cpu_count() or 1, 16)) as pool:
            sizes = pool.map(write_jpeg, jobs, chunksize=16)
    mean_w, mean_h = np.mean(sizes, axis=0)
    print(f"{count} JPEGs in {folder}, mean size {mean_w:.0f} x {mean_h:.0f} px")
    return Path(output_dir)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--count", default=1000, type=int)
    parser.add_argument("--seed", default=0, type=int)
    args = parser.parse_args(argv)
    return make_set(Path(args.output_dir), args.count, args.seed)


if __name__ == "__main__":
    main()
