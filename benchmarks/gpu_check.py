"""
The CUDA path end to end, in one script: run it on a GPU machine after any change to the training path.

  tests  the test suite (CPU tests, with CUDA visible: device autodetection, no stray .cuda())
  train  short train.py runs on the GPU at 224 px: bf16, fp16 (GradScaler), --compile (inductor), --grad-checkpointing
  ddp    torchrun --nproc_per_node <every GPU> train.py: nccl, rank-0 writes and evaluation, the open_clip export
  chain  a short chain of real sizes at 224 px in bf16: chain.py --sizes tiny,small --image-size 224 --patch-size 16
  bench  training throughput of base at batch 128, 224 px, bf16 (eager and --compile): samples/s, and MFU against
         the card's dense bf16 peak (H100 SXM / H200: 989 TFLOP/s), FLOPs = 3 x vit.flops_per_sample per sample

Every section prints its verdict and time; the summary goes to OUT/gpu_check.json and the exit status is the
number of failed sections. On one H100, expect a few minutes in all (the two inductor compilations dominate).
`--cpu-smoke` runs the same code paths at toy settings on the CPU (cpu-tiny/cpu-small at 32 px, 2 processes with
gloo, no inductor), to check the script itself without a GPU.

    python benchmarks/gpu_check.py                         # everything, on the GPU(s) of this machine
    python benchmarks/gpu_check.py --only bench            # the throughput figures alone
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gpu_check
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import interop  # noqa: E402
import recipe  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
import vit  # noqa: E402
from tokenizer import VOCAB_SIZES  # noqa: E402

SECTIONS = ("tests", "train", "ddp", "chain", "bench")
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))  # dense, by device name


def run(cmd, timeout):
    """Run a command in the repo root, echoing its output; returns its stdout (raises when it fails)."""
    print("$", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    print(p.stdout[-3000:] + p.stderr[-3000:], flush=True)
    if p.returncode != 0:
        raise RuntimeError(f"exit status {p.returncode}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    return p.stdout


def final_metrics(stdout):
    """train.py ends its output with its final metrics, a JSON object opening on a line of its own."""
    lines = stdout.splitlines()
    metrics = json.loads("\n".join(lines[max(i for i, line in enumerate(lines) if line == "{"):]))
    if not math.isfinite(metrics.get("loss", float("nan"))):
        raise RuntimeError(f"no finite final loss: {metrics}")
    return metrics


def train_runs(a, out):
    common = ["--size", a.size, "--data", "synthetic", "--image-size", str(a.image_size), "--patch-size", "16",
              "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--eval-every", "0", "--log-every", "5",
              "--device", a.device, "--workers", str(a.workers)]
    variants = {"bf16": ["--precision", "bf16"], "fp16": ["--precision", "fp16"],
                "grad_checkpointing": ["--grad-checkpointing"]}
    if not a.cpu_smoke:  # inductor needs a minute of C++ builds on a CPU: the GPU check compiles for real
        variants["compile"] = ["--compile"]
    results = {}
    for name, flags in variants.items():
        metrics = final_metrics(run([sys.executable, "train.py", *common, *flags, "--out", os.path.join(out, name)],
                                    a.timeout))
        results[name] = {k: metrics[k] for k in ("loss", "wall_time_s")}
    return results


def ddp_run(a, out):
    n = 2 if a.cpu_smoke else torch.cuda.device_count()  # nccl wants one GPU per process
    run_dir = os.path.join(out, "ddp")
    stdout = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "train.py",
                  "--size", a.size, "--data", "synthetic", "--image-size", str(a.image_size), "--patch-size", "16",
                  "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--device", a.device,
                  "--workers", str(a.workers), "--out", run_dir], a.timeout)
    metrics = final_metrics(stdout)
    if metrics["samples_seen"] != a.steps * a.batch_size * n:
        raise RuntimeError(f"samples_seen {metrics['samples_seen']}, expected {a.steps} x {a.batch_size} x {n}")
    exported = interop.load_model(os.path.join(run_dir, "open_clip")).state_dict()
    ckpt = torch.load(os.path.join(run_dir, interop.RUN_CHECKPOINT), map_location="cpu", weights_only=True)
    if not all(torch.equal(exported[k], v) for k, v in ckpt["model"].items()):
        raise RuntimeError("the open_clip export differs from the checkpoint")
    return {"processes": n, "loss": metrics["loss"], "zeroshot_top1": metrics["zeroshot_top1"]}


def chain_run(a, out):
    sizes = "cpu-tiny,cpu-small" if a.cpu_smoke else "tiny,small"
    stdout = run([sys.executable, "chain.py", "--sizes", sizes, "--data", "synthetic", "--steps", f"{a.steps},{a.steps}",
                  "--image-size", str(a.image_size), "--patch-size", "16", "--batch-size", str(a.batch_size),
                  "--precision", "bf16", "--eval-every", "0", "--device", a.device, "--workers", str(a.workers),
                  "--out", os.path.join(out, "chain")], a.timeout)
    with open(os.path.join(out, "chain", "report.json")) as f:
        report = json.load(f)
    return {"report_rows": len(report["stages"]), "tail": stdout.strip().splitlines()[-1][:200]}


def bench(a, compile):
    """Training-step throughput (train.train_step on random data: no loading) of --bench-size at its batch."""
    device = runtime.pick_device(a.device)
    cfg = vit.config(a.bench_size, image_size=a.bench_image_size, patch_size=16, context_length=77,
                     vocab_size=VOCAB_SIZES["clip-bpe"], tokenizer="clip-bpe")  # CLIP's ViT-*-16 text shape
    torch.manual_seed(0)
    model = vit.CLIP(cfg).to(device).train()
    if compile:
        model.visual.compile()
        model.transformer.compile()
    objective = train.Objective(model)
    optimizer = recipe.make_optimizer(model, recipe.SYNTHETIC_LR, recipe.WEIGHT_DECAY, device)
    B = a.bench_batch_size
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, device=device)
    tokens = torch.randint(1, cfg.vocab_size - 1, (B, cfg.context_length), device=device)
    tokens[:, 20] = cfg.vocab_size - 1  # the end-of-text token, where the text features are read

    def step():  # train_step ends with .tolist(): the device is synchronised
        train.train_step(objective, optimizer, images, tokens, 1e-4, 1.0, precision="bf16")
    for _ in range(a.bench_warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(a.bench_steps):
        step()
    samples_per_s = B * a.bench_steps / (time.perf_counter() - t0)
    flops = 3 * vit.flops_per_sample(cfg) * samples_per_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = a.peak_tflops * 1e12 or next((p for key, p in PEAK_BF16 if key in name), 0.0)
    return {"device": name, "size": a.bench_size, "batch": B, "image_size": cfg.image_size, "compile": compile,
            "samples_per_s": round(samples_per_s, 1), "tflops": round(flops / 1e12, 1),
            "mfu": round(flops / peak, 3) if peak else None, "peak_tflops": peak / 1e12 or None,
            "max_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None}


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of sections: {', '.join(SECTIONS)}")
    p.add_argument("--out", default="runs/gpu_check", help="output folder of the runs and gpu_check.json")
    p.add_argument("--cpu-smoke", action="store_true", help="toy settings on the CPU: checks the script, not CUDA")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the card's dense bf16 peak in TFLOP/s for the "
                   "MFU (0: from the device name: H100 SXM/H200 989, H100 PCIe 756, A100 312)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per command before it counts as failed")
    a = p.parse_args()
    toy = a.cpu_smoke
    a.device, a.workers = ("cpu", 0) if toy else ("cuda", 4)
    a.size, a.image_size, a.batch_size, a.steps = ("cpu-tiny", 32, 8, 2) if toy else ("tiny", 224, 64, 20)
    a.bench_size, a.bench_image_size, a.bench_batch_size = ("cpu-tiny", 32, 8) if toy else ("base", 224, 128)
    a.bench_warmup, a.bench_steps = (1, 2) if toy else (5, 20)
    if not toy and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; run with --cpu-smoke to check the script on the CPU")
    os.makedirs(a.out, exist_ok=True)

    tests = ["tests/test_train.py", "tests/test_ddp.py"] if toy else []  # smoke: a sample of the suite
    checks = {
        "tests": lambda: run([sys.executable, "-m", "pytest", "-q", *tests], a.timeout).strip().splitlines()[-1],
        "train": lambda: train_runs(a, a.out),
        "ddp": lambda: ddp_run(a, a.out),
        "chain": lambda: chain_run(a, a.out),
        "bench": lambda: [bench(a, compile=False)] + ([] if toy else [bench(a, compile=True)]),
    }
    summary = {"torch": torch.__version__, "cuda": torch.version.cuda, "git": runtime.git_hash(), "cpu_smoke": toy}
    for name in a.only.split(","):
        if name not in checks:
            sys.exit(f"error: --only {name}: choose from {', '.join(SECTIONS)}")
        print(f"== {name}", flush=True)
        t0 = time.time()
        try:
            summary[name] = {"ok": True, "result": checks[name]()}
        except Exception as e:  # one failed section does not hide the others
            summary[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        summary[name]["seconds"] = round(time.time() - t0, 1)
        print(f"== {name}: {'ok' if summary[name]['ok'] else 'FAILED'} ({summary[name]['seconds']} s)", flush=True)
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    sys.exit(sum(not v["ok"] for v in summary.values() if isinstance(v, dict)))


if __name__ == "__main__":
    main()
