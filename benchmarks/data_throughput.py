"""
Decode + augment throughput of data.py's training loader (images/s), on JPEGs written here in the layouts
CC3M comes in: img2dataset webdataset shards and an open_clip CSV with image files.

    python benchmarks/data_throughput.py                      # 224 px crops of 256 px JPEGs, 2 workers
    python benchmarks/data_throughput.py --source-size 512    # like pixparse/cc3m-wds (shorter edge 512)

Each row is the steady rate over the epoch after the first batch (DataLoader start-up excluded), on CPU.
"""

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402


def photo(rng, width, height):
    """A photo-like JPEG: smooth colour gradients, a few shapes, sensor noise (about 15-40 KB at 256 px)."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    slope_x, slope_y = rng.uniform(-120, 120, (2, 3, 1, 1))
    base = rng.uniform(0, 255, (3, 1, 1)) + slope_x * x + slope_y * y
    pixels = base.transpose(1, 2, 0) + rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.3) * width
        draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_dataset(root, n, source_size, per_shard=256):
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"))
    rows, total = ["filepath\ttitle"], 0
    for s in range(0, n, per_shard):
        with tarfile.open(os.path.join(root, f"{s // per_shard:05d}.tar"), "w") as tar:
            for i in range(s, min(s + per_shard, n)):
                w = source_size if rng.random() < 0.5 else int(source_size * rng.uniform(1.0, 1.5))
                raw, caption = photo(rng, w, source_size), f"a photo of thing number {i}".encode()
                total += len(raw)
                for name, payload in ((f"{i:09d}.jpg", raw), (f"{i:09d}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                with open(os.path.join(root, "images", f"{i}.jpg"), "wb") as f:
                    f.write(raw)
                rows.append(f"images/{i}.jpg\ta photo of thing number {i}")
    with open(os.path.join(root, "train.tsv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return total / n


def rate(source, args, **kw):
    td = data.build_train_data(source, tokenizer="byte", context_length=77, batch_size=args.batch_size,
                               workers=args.workers, seed=0, **kw)
    batches = td.batches(0)
    next(batches)  # start-up: worker processes, first shuffle buffer
    start, n = time.perf_counter(), 0
    for images, _ in batches:
        n += images.shape[0]
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1536, help="JPEGs written")
    p.add_argument("--source-size", type=int, default=256, help="shorter edge of the JPEGs in pixels")
    p.add_argument("--image-size", type=int, default=224, help="training crop in pixels")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        kb = write_dataset(root, args.images, args.source_size) / 1024
        print(f"{args.images} JPEGs of {args.source_size} px shorter edge ({kb:.0f} KB on average), "
              f"{args.image_size} px crops, batch {args.batch_size}, {args.workers} workers, {os.cpu_count()} CPUs")
        shards = os.path.join(root, "{00000..%05d}.tar" % ((args.images - 1) // 256))
        for name, source in (("img2dataset shards", shards), ("CSV + files", os.path.join(root, "train.tsv"))):
            print(f"{name:20s} {rate(source, args, image_size=args.image_size):7.0f} images/s")
    print("(the synthetic set: benchmarks/synthetic_speed.py)")


if __name__ == "__main__":
    main()
