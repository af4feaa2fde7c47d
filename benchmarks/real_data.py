"""
The real-data path end to end, on a small CC3M-like set drawn here: distinct pictures of a coloured shape in a corner
("a red triangle at the top left"), written in the layouts CC3M comes in (img2dataset's webdataset shards and files
folders, an open_clip CSV). A tiny model trains from the shards with README's command (the issue-26 command, the set
in place of cc3m/), and its retrieval is then scored on every layout of the same pairs: the figures must be equal, and
far above chance. tests/test_real_data.py writes its sets with the functions here.

    python benchmarks/real_data.py                      # 400 steps, a few minutes on a laptop CPU
    python benchmarks/real_data.py --bpe bpe_simple_vocab_16e6.txt.gz

Writes results/real-data.md. The CLIP BPE vocabulary comes from --bpe or an installed open_clip; without one the run
uses the byte tokenizer, and the results file says so.
"""

import argparse
import io
import json
import os
import shlex
import sys
import tarfile
import tempfile
import time

from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import evaluate  # noqa: E402
import runtime  # noqa: E402
import tokenizer  # noqa: E402
import train  # noqa: E402
from results import header  # noqa: E402

# -----------------------------------------------------------------------------
# the pairs: every (shape, colour, corner) once, so that each caption describes one picture only

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "purple": (150, 60, 200), "orange": (245, 140, 30)}
CORNERS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
MAX_PAIRS = len(SHAPES) * len(COLOURS) * len(CORNERS)  # 96


def draw(shape, colour, corner, size):
    """A light grey picture with one shape of `colour` filling most of the quarter at `corner`."""
    image = Image.new("RGB", (size, size), (230, 230, 230))
    pen, fill = ImageDraw.Draw(image), COLOURS[colour]
    half = size // 2
    x, y = (c * half + half // 8 for c in CORNERS[corner])  # the shape's box: 3/4 of the quarter, centred
    s = half * 3 // 4
    if shape == "circle":
        pen.ellipse([x, y, x + s, y + s], fill=fill)
    elif shape == "square":
        pen.rectangle([x, y, x + s, y + s], fill=fill)
    elif shape == "triangle":
        pen.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=fill)
    else:  # a cross: two bars a third of the box wide
        pen.rectangle([x + s // 3, y, x + 2 * s // 3, y + s], fill=fill)
        pen.rectangle([x, y + s // 3, x + s, y + 2 * s // 3], fill=fill)
    return image


def pairs(n=MAX_PAIRS, size=64):
    """n distinct (JPEG bytes, caption) pairs; the shape changes fastest, then the colour, then the corner."""
    if not 0 < n <= MAX_PAIRS:
        raise ValueError(f"pairs: n must be in 1..{MAX_PAIRS}, got {n}")
    out = []
    for i in range(n):
        shape, colour = SHAPES[i % len(SHAPES)], list(COLOURS)[i // len(SHAPES) % len(COLOURS)]
        corner = list(CORNERS)[i // (len(SHAPES) * len(COLOURS))]
        buffer = io.BytesIO()
        draw(shape, colour, corner, size).save(buffer, "JPEG", quality=95)
        article = "an" if colour[0] in "aeiou" else "a"
        out.append((buffer.getvalue(), f"{article} {colour} {shape} at the {corner}"))
    return out


# -----------------------------------------------------------------------------
# the layouts (img2dataset names a sample by its shard and its place in it: key 000020003 is shard 2's fourth)


def _stats(path, n):
    """img2dataset's NNNNN_stats.json beside shard or folder NNNNN (its "successes": the samples written)."""
    with open(path, "w") as f:
        json.dump({"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0}, f)


def _groups(samples, per_group):
    return [(g, [(f"{g:05d}{i:04d}", *s) for i, s in enumerate(samples[k:k + per_group])])
            for g, k in enumerate(range(0, len(samples), per_group))]


def write_shards(folder, samples, per_shard, stats=True, sidecars=True):
    """img2dataset's webdataset layout: NNNNN.tar of key.jpg + key.txt (+ key.json), NNNNN_stats.json."""
    os.makedirs(folder, exist_ok=True)
    for g, group in _groups(samples, per_shard):
        with tarfile.open(os.path.join(folder, f"{g:05d}.tar"), "w") as tar:
            for key, raw, caption in group:
                members = [("jpg", raw), ("txt", caption.encode())] + [("json", b'{"status": "success"}')] * sidecars
                for ext, payload in members:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        if stats:
            _stats(os.path.join(folder, f"{g:05d}_stats.json"), len(group))
    return folder


def write_files(folder, samples, per_folder, stats=True, sidecars=True):
    """img2dataset's files layout: NNNNN/key.jpg + key.txt (+ key.json), NNNNN_stats.json."""
    for g, group in _groups(samples, per_folder):
        os.makedirs(os.path.join(folder, f"{g:05d}"), exist_ok=True)
        for key, raw, caption in group:
            members = [("jpg", raw), ("txt", caption.encode())] + [("json", b'{"status": "success"}')] * sidecars
            for ext, payload in members:
                with open(os.path.join(folder, f"{g:05d}", f"{key}.{ext}"), "wb") as f:
                    f.write(payload)
        if stats:
            _stats(os.path.join(folder, f"{g:05d}_stats.json"), len(group))
    return folder


def write_csv(path, samples, images="images", delimiter=","):
    """open_clip's CSV (a .tsv with a tab): columns filepath and title, the images in `images` beside it."""
    root = os.path.dirname(os.path.abspath(path))
    os.makedirs(os.path.join(root, images), exist_ok=True)
    rows = [f"filepath{delimiter}title"]
    for i, (raw, caption) in enumerate(samples):
        with open(os.path.join(root, images, f"{i:05d}.jpg"), "wb") as f:
            f.write(raw)
        rows.append(f"{images}/{i:05d}.jpg{delimiter}{caption}")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path


# -----------------------------------------------------------------------------
# the benchmark


def layouts(root, samples):
    """The same pairs as 6 shards (README's cc3m/{00000..00005}.tar) named three ways, a files folder and a CSV."""
    cc3m = write_shards(os.path.join(root, "cc3m"), samples, len(samples) // 6)
    return {"brace range": os.path.join(cc3m, "{00000..00005}.tar"), "glob": os.path.join(cc3m, "*.tar"),
            "folder of shards": cc3m, "img2dataset files": write_files(os.path.join(root, "files"), samples, 16),
            "CSV": write_csv(os.path.join(root, "cc3m.csv"), samples)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400, help="training steps (README's command: 400)")
    p.add_argument("--bpe", default="", help="CLIP BPE vocabulary file (default: an installed open_clip's)")
    p.add_argument("--out", default=os.path.join(HERE, "..", "results", "real-data.md"), help="results file")
    args = p.parse_args()
    bpe = args.bpe or tokenizer.find_bpe()
    words = ["--bpe", bpe] if bpe else ["--tokenizer", "byte"]
    samples = pairs(MAX_PAIRS, 64)
    with tempfile.TemporaryDirectory() as root:
        sources, run = layouts(root, samples), os.path.join(root, "run")
        shards = sources["brace range"]
        argv = ["--size", "cpu-tiny", "--data", shards, "--val-data", shards, "--image-size", "64", "--patch-size",
                "16", "--steps", str(args.steps), "--batch-size", "32", "--lr", "1e-3", "--warmup", "40",
                "--eval-every", "0", "--out", run, *words]
        t0 = time.time()
        train.main(argv)
        seconds = time.time() - t0
        with open(os.path.join(run, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        precision = runtime.load_json(os.path.join(run, "config.json"))["precision"]
        scored = {name: evaluate.main(["--model", run, "--retrieval", source, "--out", os.path.join(root, "e.json"),
                                       *words]) for name, source in sources.items()}
        shown = " ".join(shlex.quote(a) for a in ["python", "train.py", *argv]).replace(root + os.sep, "")
    loss = next(r["loss"] for r in reversed(records) if "loss" in r)
    keys = ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")
    rows = [("train.py's final evaluation (brace range)", records[-1])] + [
        (f"evaluate.py --retrieval ({name})", metrics) for name, metrics in scored.items()]
    same = [all(metrics[k] == rows[1][1][k] for k in keys) for _, metrics in rows]
    lines = [*header("The real-data path: trained from shards, scored on every layout", "idle machine"),
             f"{MAX_PAIRS} distinct pairs (4 shapes x 6 colours x 4 corners, 64 px JPEGs, captions such as "
             f"\"{samples[0][1]}\") as 6 img2dataset shards, a files folder and a CSV. Trained from the shards "
             f"({precision}) in {seconds:.0f} s to a loss of {loss:.3f} by", "", f"    {shown}", "",
             f"Tokenizer: {'CLIP BPE' if bpe else 'byte (no CLIP BPE vocabulary found)'}. Chance: R@1 "
             f"{100 / MAX_PAIRS:.2f}%, R@5 {500 / MAX_PAIRS:.2f}%.", "",
             "| scored by | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys),
             *[f"| {name} | " + " | ".join(f"{100 * m[k]:.2f}%" for k in keys) + " |" for name, m in rows], "",
             f"evaluate.py scores every layout alike: {'yes' if all(same[1:]) else 'NO'}; as train.py's own final "
             f"evaluation: {'yes' if same[0] else 'no (another precision)'}."]
    if bpe:  # the vocabulary by its file name, not this machine's path
        lines = [line.replace(bpe, os.path.basename(bpe)) for line in lines]
    runtime.save_text("\n".join(lines) + "\n", args.out)
    print("\n".join(lines))
    if not all(same[1:]):
        sys.exit("error: the layouts of the same pairs scored differently")


if __name__ == "__main__":
    main()
