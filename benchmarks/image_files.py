"""Training images held in memory against read from their files batch by batch (`ImageFiles`).

A real run's set outgrows memory (100,000 SDXL images are 300 GB decoded), so past `max_image_memory_gb` the
trainer reads each batch's PNG files, the next batch in a thread while this one trains. This measures what that
costs: the memory each way, the time to make the set (a read set opens each file's header only), and how many
images a second the batches are read at, to set beside a training step's rate (SD1.5 on an H100: 34.5 images/s,
RESULTS.md). The images are photo-like (smooth colour fields with grain), so their PNGs are about a photo's size.

    python benchmarks/image_files.py [--images 128] [--sizes 512,1024] [--batch 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from t2i_evolve.train import ImageFiles, TrainingSet


def photo_like(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [np.sin(x * rng.uniform(2, 9) + rng.uniform(0, 6)) * np.cos(y * rng.uniform(2, 9)) for _ in range(3)]
    smooth = (np.stack(channels, -1) * 0.5 + 0.5) * 255
    return Image.fromarray(np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8))


def measure(folder: Path, n: int, size: int, batch: int) -> dict:
    paths = []
    for i in range(n):
        paths.append(folder / f"{size}-{i:05d}.png")
        photo_like(size, i).save(paths[-1])
    prompts = [f"image {i}" for i in range(n)]
    row = {"size": size, "images": n, "png_mb": sum(p.stat().st_size for p in paths) / n / 2**20}
    for name, memory in (("held", float("inf")), ("read", 0.0)):
        tick = time.perf_counter()
        data = TrainingSet.from_files(prompts, paths, max_memory_gb=memory)
        row[f"{name}_make_s"] = time.perf_counter() - tick
        row[f"{name}_mb"] = (data.images.numel() if isinstance(data.images, torch.Tensor) else 0) / 2**20
        assert isinstance(data.images, ImageFiles) == (name == "read")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        tick = time.perf_counter()
        for start in range(0, n - batch + 1, batch):
            data.pixels(order[start:start + batch])
        row[f"{name}_images_per_s"] = (n // batch) * batch / (time.perf_counter() - tick)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(Path(folder), args.images, int(size), args.batch) for size in args.sizes.split(",")]
    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print(f"{args.images} images, batches of {args.batch}, {torch.get_num_threads()} torch threads")
    print("| size | PNG MB each | held: memory MB | held: make s | held: images/s | read: memory MB | read: make s "
          "| read: images/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['png_mb']:.2f} | {r['held_mb']:,.0f} | {r['held_make_s']:.2f} | "
              f"{r['held_images_per_s']:,.0f} | {r['read_mb']:,.0f} | {r['read_make_s']:.2f} | "
              f"{r['read_images_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
