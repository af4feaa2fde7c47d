"""
Speed of the synthetic set: augmented training pictures per second, images and tokens of each batch ready on the
device (synthetic.TrainData.batches, as train.py reads them), at the set's default data shape.

    python benchmarks/synthetic_speed.py                  # the CPU with torch's default threads, and CUDA if present
    python benchmarks/synthetic_speed.py --threads 1 --batch-sizes 64,256
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batch-sizes", default="64,256,1024", help="comma list of batch sizes")
    parser.add_argument("--gpu-batch-sizes", default="1024,8192,32768", help="comma list of batch sizes on CUDA")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    parser.add_argument("--captions-per-image", type=int, default=1, help="captions per picture")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"synthetic set: {synthetic.IMAGE_SIZE} px, context {synthetic.CONTEXT_LENGTH}, "
          f"{args.captions_per_image} caption(s) per picture; torch {torch.__version__}")
    runs = [(torch.device("cpu"), int(b)) for b in args.batch_sizes.split(",")]
    if torch.cuda.is_available():
        runs += [(torch.device("cuda"), int(b)) for b in args.gpu_batch_sizes.split(",")]
    for device, batch_size in runs:
        where = f"cpu, {torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name()
        speed = pictures_per_second(device, batch_size, args.seconds, args.captions_per_image)
        print(f"{where:>24}  batch {batch_size:6d}: {speed:12,.0f} pictures/s")


if __name__ == "__main__":
    main()
