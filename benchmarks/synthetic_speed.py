"""
Speed of the synthetic set: augmented training pictures per second, images and tokens of each batch ready on the
device (synthetic.TrainData.batches, as train.py reads them), at the set's default data shape. Writes
results/synthetic-speed.md.

    python benchmarks/synthetic_speed.py                  # the CPU with torch's default threads, and CUDA if present
    python benchmarks/synthetic_speed.py --threads 1 --batch-sizes 64,256
    git show REV:synthetic.py > /tmp/before.py && python benchmarks/synthetic_speed.py --against /tmp/before.py

--against times another version's renderer in alternating rounds in the same process (same batches, same
conditions), and checks that it draws the same pictures bit for bit.
"""
import argparse
import importlib.util
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]
import results  # noqa: E402
import synthetic  # noqa: E402
import tokenizer as tokenizers  # noqa: E402


def pictures_per_second(device, batch_size, seconds, captions_per_image=1):
    """Training pictures/s of TrainData.batches on `device` (after one warm-up batch), timed for about `seconds`."""
    data = synthetic.TrainData(synthetic.NUM_SAMPLES, batch_size, seed=0,
                               tokenizer=tokenizers.get_tokenizer(synthetic.TOKENIZER), device=device,
                               captions_per_image=captions_per_image)
    batches = data.batches(epoch=0)
    next(batches)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start, n = time.perf_counter(), 0
    for images, tokens in batches:
        n += len(images)
        if time.perf_counter() - start > seconds:
            break
    sync()
    return n / (time.perf_counter() - start)


def load_renderer(path):
    """render() of another version of synthetic.py (a file), for --against."""
    spec = importlib.util.spec_from_file_location("synthetic_against", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.render


def rounds(device, batch_size, args, renderers):
    """The best of args.rounds alternating rounds of each renderer (name -> render), pictures/s."""
    best = {name: 0.0 for name in renderers}
    own = synthetic.render
    try:
        for _ in range(args.rounds):
            for name, render in renderers.items():
                synthetic.render = render  # TrainData.batch draws through the module's render
                speed = pictures_per_second(device, batch_size, args.seconds / args.rounds, args.captions_per_image)
                best[name] = max(best[name], speed)
    finally:
        synthetic.render = own
    return best


def same_pictures(render, device):
    """Whether `render` draws the pictures of this version bit for bit (two batches, with and without the crop)."""
    index = torch.arange(1000, 1512, device=device)
    attrs = synthetic.scene(0, "train", index)
    return all(torch.equal(synthetic.render(attrs, crop), render(attrs, crop))
               for crop in (synthetic.view(0, 1, index, True), synthetic.view(0, 1, index, False)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batch-sizes", default="64,256,1024", help="comma list of batch sizes")
    parser.add_argument("--gpu-batch-sizes", default="1024,8192,32768", help="comma list of batch sizes on CUDA")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement and renderer")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per measurement (best one kept)")
    parser.add_argument("--captions-per-image", type=int, default=1, help="captions per picture")
    parser.add_argument("--against", default="", help="another version's synthetic.py to time alongside")
    parser.add_argument("--conditions", default="not stated (pass --conditions, e.g. 'idle machine')",
                        help="the machine's state, for the results file")
    parser.add_argument("--out", default="synthetic-speed.md", help="results file name under results/")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    renderers = {"this version": synthetic.render}
    if args.against:
        renderers[f"--against {os.path.basename(args.against)}"] = load_renderer(args.against)
    runs = [(torch.device("cpu"), int(b)) for b in args.batch_sizes.split(",")]
    if torch.cuda.is_available():
        runs += [(torch.device("cuda"), int(b)) for b in args.gpu_batch_sizes.split(",")]
    lines = results.header("Synthetic set: training pictures per second", args.conditions) + [
        f"{synthetic.IMAGE_SIZE} px, context {synthetic.CONTEXT_LENGTH}, {args.captions_per_image} caption(s) per "
        f"picture; images and tokens of TrainData.batches; the best of {args.rounds} alternating rounds of "
        f"{args.seconds / args.rounds:.1f} s per renderer.", "",
        "| device | batch | " + " | ".join(renderers) + " |", "| --- | ---: |" + " ---: |" * len(renderers)]
    for device, batch_size in runs:
        where = f"cpu, {torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name()
        best = rounds(device, batch_size, args, renderers)
        lines.append(f"| {where} | {batch_size} | " + " | ".join(f"{v:,.0f}" for v in best.values()) + " |")
        print(lines[-1], flush=True)
    if args.against:
        same = same_pictures(renderers[f"--against {os.path.basename(args.against)}"], torch.device("cpu"))
        lines += ["", f"The same pictures as --against, bit for bit: {'yes' if same else 'NO'}."]
    print(f"wrote {results.write(args.out, lines)}")


if __name__ == "__main__":
    main()
