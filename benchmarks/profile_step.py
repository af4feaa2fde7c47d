"""
Where a training step's time goes on this machine: torch.profiler's per-op table for whole steps of train.py's
train_step (forward, CLIP loss, backward, grad clipping, fused AdamW, logit-scale clamp) at the main command's
stage-1 shape (tiny at the synthetic set's 32 px, patch 8, 32 tokens of its own captions, the chain's batch) and
at 224 px / patch 16 / 77 tokens (captions that fill the context). Writes results/profile-cpu.md.

    python benchmarks/profile_step.py --conditions "idle machine"
    python benchmarks/profile_step.py --threads 1 --steps 3 --rows 20
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]
import data  # noqa: E402
import recipe  # noqa: E402
import results  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
import vit  # noqa: E402
from tokenizer import VOCAB_SIZES  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul",
          "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_"
          "backward", "aten::convolution", "aten::convolution_backward", "aten::mkldnn_convolution")  # the GEMM work


def shapes(batch_size):
    """name -> (config, tokens maker): the main command's stage 1 and the 224 px shape."""
    synthetic = data.default_shape("synthetic")
    stage1 = vit.config("tiny", image_size=synthetic["image_size"], patch_size=synthetic["patch_size"],
                        context_length=synthetic["context_length"], vocab_size=VOCAB_SIZES["byte"])
    big = vit.config("tiny", image_size=224, patch_size=16, context_length=77, vocab_size=VOCAB_SIZES["clip-bpe"])

    def synthetic_tokens(cfg):  # a batch of the synthetic set's own captions
        return next(data.build_train_data("synthetic", tokenizer=synthetic["tokenizer"], image_size=cfg.image_size,
                                          context_length=cfg.context_length, batch_size=batch_size, workers=0,
                                          seed=0).batches(0))[1]

    def full_tokens(cfg):  # random captions that fill the context, end-of-text (the largest id) last
        tokens = torch.randint(1, cfg.vocab_size - 1, (batch_size, cfg.context_length),
                               generator=torch.Generator().manual_seed(0))
        tokens[:, -1] = cfg.vocab_size - 1
        return tokens
    return {f"stage 1 of the main command: tiny, {stage1.image_size} px, patch {stage1.patch_size}, "
            f"{stage1.context_length} tokens, batch {batch_size}": (stage1, synthetic_tokens),
            f"tiny, 224 px, patch 16, 77 tokens (captions fill them), batch {batch_size}": (big, full_tokens)}


def step_for(cfg, tokens_of, batch_size, precision):
    """train.train_step as train() runs it, on one fixed batch of random images."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = vit.CLIP(cfg).train()
    settings = train.Settings(device="cpu")
    objective, optimizer = train.Objective(model), recipe.make_optimizer(model, settings.lr, settings.wd, device)
    images = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    tokens = tokens_of(cfg)
    return lambda: train.train_step(objective, optimizer, images, tokens, settings.lr, settings.grad_clip,
                                    precision=precision)


def table(events, steps, rows):
    """Markdown rows of the ops with the most self CPU time (ms per step), and the matmul share."""
    ops = sorted((e for e in events if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    matmul = sum(e.self_cpu_time_total for e in ops if e.key in MATMUL)
    lines = ["| op | self CPU ms / step | share | calls / step |", "| --- | ---: | ---: | ---: |"]
    for e in ops[:rows]:
        lines.append(f"| `{e.key}` | {e.self_cpu_time_total / 1e3 / steps:.2f} | {e.self_cpu_time_total / total:.1%} | "
                     f"{e.count / steps:.0f} |")
    lines.append(f"| (all {len(ops)} ops) | {total / 1e3 / steps:.2f} | 100% | |")
    return lines, matmul / total


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=recipe.SYNTHETIC_BATCH, help="pairs per step (the chain's)")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per shape, after 2 untimed ones")
    parser.add_argument("--rows", type=int, default=25, help="ops listed per shape")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--precision", default="", help="bf16 or fp32 (default: train.py's for this CPU)")
    parser.add_argument("--conditions", default="not stated (pass --conditions, e.g. 'idle machine')",
                        help="the machine's state, for the results file")
    parser.add_argument("--out", default="profile-cpu.md", help="results file name under results/")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision or runtime.default_precision(torch.device("cpu"))
    lines = results.header("Where a training step's time goes (torch.profiler, CPU)", args.conditions) + [
        f"train.train_step ({precision}, fused AdamW, grad clipping), {args.steps} profiled steps per shape after 2 "
        f"untimed; self CPU time per op, per step. Matmul share: GEMM-backed ops ({', '.join(m for m in MATMUL[:5])}, "
        "SDPA, convolution) over all ops. bf16 matrix instructions: "
        f"{'yes' if runtime.has_bf16_matmul() else 'no'}; AMX: "
        f"{'yes' if torch.cpu.get_capabilities().get('amx_bf16') else 'no'}.", ""]
    for name, (cfg, tokens_of) in shapes(args.batch_size).items():
        step = step_for(cfg, tokens_of, args.batch_size, precision)
        step(), step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        rows, share = table(prof.key_averages(), args.steps, args.rows)
        lines += [f"## {name}", "", f"Matmul share of op time: {share:.0%}.", "", *rows, ""]
        print("\n".join(lines[-len(rows) - 5:]), flush=True)
    print(f"wrote {results.write(args.out, lines)}")


if __name__ == "__main__":
    main()
