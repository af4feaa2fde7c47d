"""
What one end-of-stage evaluation costs at the main command's data shape, part by part: rendering the held-out
synthetic pictures (first time and cached), the text tower (zero-shot prompts, retrieval captions), the image tower
(zero-shot, retrieval and probe pictures) and the attribute probes' fits on their cached features, for each size of
the chain (random weights: the cost does not depend on them, but for the probes' solver, whose iterations do).
Writes results/eval-cost.md.

    python benchmarks/eval_cost.py --sizes tiny --conditions "idle machine"
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]
import data  # noqa: E402
import evaluate  # noqa: E402
import results  # noqa: E402
import runtime  # noqa: E402
import synthetic  # noqa: E402
import vit  # noqa: E402
from tokenizer import VOCAB_SIZES  # noqa: E402


def seconds(work):
    start = time.perf_counter()
    out = work()
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small,base", help="comma list of model sizes")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--conditions", default="not stated (pass --conditions, e.g. 'idle machine')",
                        help="the machine's state, for the results file")
    parser.add_argument("--out", default="eval-cost.md", help="results file name under results/")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = data.default_shape("synthetic")
    tokenizer = data.get_tokenizer(shape["tokenizer"])
    device, precision = torch.device("cpu"), runtime.default_precision(torch.device("cpu"))
    build = lambda: evaluate.build_eval_sets("synthetic", tokenizer=tokenizer, image_size=shape["image_size"],  # noqa
                                             context_length=shape["context_length"])
    synthetic._HELD_OUT.clear()
    cold, sets = seconds(build)
    warm, sets = seconds(build)
    zs, retrieval, probes = sets["zeroshot"], sets["retrieval"]["batches"], sets["probes"]
    images = torch.cat([x for x, _ in zs["batches"]] + [x for x, _ in retrieval] + [probes[p][0] for p in probes])
    texts = torch.cat([zs["tokens"].flatten(0, 1)] + [t.flatten(0, 1) for _, t in retrieval])
    lines = results.header("The cost of one end-of-stage evaluation (synthetic set, CPU)", args.conditions) + [
        f"{shape['image_size']} px, {shape['context_length']} tokens, {precision}; {len(images)} pictures (zero-shot, "
        f"retrieval, probes) and {len(texts)} texts (prompts, retrieval captions), each encoded once. Held-out "
        f"pictures rendered in {cold:.2f} s the first time, {warm:.3f} s from the cache.", "",
        "| size | image tower (s) | text tower (s) | probe fits, 6 attributes (s) | all (s) |",
        "| --- | ---: | ---: | ---: | ---: |"]
    for size in args.sizes.split(","):
        torch.manual_seed(0)
        model = vit.CLIP(vit.config(size, image_size=shape["image_size"], patch_size=shape["patch_size"],
                                    context_length=shape["context_length"], vocab_size=VOCAB_SIZES[shape["tokenizer"]]))
        model.eval()
        image_s, _ = seconds(lambda: evaluate.embed(model.encode_image, images, device, precision))
        text_s, _ = seconds(lambda: evaluate.embed(model.encode_text, vit.trim_tokens(texts), device, precision))
        probe_s, _ = seconds(lambda: evaluate.attribute_probes(model, probes, device, precision))
        fit_s = probe_s - image_s * sum(len(probes[p][0]) for p in probes) / len(images)  # less the probes' features
        lines.append(f"| {size} | {image_s:.1f} | {text_s:.1f} | {fit_s:.1f} | {image_s + text_s + fit_s:.1f} |")
        print(lines[-1], flush=True)
    print(f"wrote {results.write(args.out, lines)}")


if __name__ == "__main__":
    main()
