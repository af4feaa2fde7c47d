"""
An experiment for CPUs without AMX: the forward on a bf16 copy of the matmul weights, kept between steps and refreshed
after each optimizer step by one multi-tensor copy (AdamW keeps its fp32 master weights), instead of autocast casting
every weight at every step. Checks that the losses are bit for bit those of train.train_step over a few steps, then
times both in alternating rounds at the main command's stage-1 shape and at 224 px. Writes results/bf16-weights.md.

    python benchmarks/bf16_weights.py --conditions "idle machine"
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
from torch.func import functional_call

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]
import profile_step  # noqa: E402  (the two shapes and train.train_step's setup)
import recipe  # noqa: E402
import results  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
import vit  # noqa: E402

CAST = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "c_fc.weight", "c_fc.bias",
        "c_proj.weight", "c_proj.bias", "conv1.weight", "visual.proj", "text_projection")  # what autocast casts


class Bf16Step:
    """train.train_step (no teacher, bf16 autocast) with the matmul weights read from persistent bf16 leaves."""

    def __init__(self, objective, optimizer):
        self.objective, self.optimizer = objective, optimizer
        named = dict(objective.named_parameters())
        self.names = [n for n in named if n.endswith(CAST)]
        self.masters = [named[n] for n in self.names]
        self.copies = [p.detach().to(torch.bfloat16).requires_grad_() for p in self.masters]

    def __call__(self, images, tokens, lr, grad_clip):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tokens = vit.trim_tokens(tokens)
        with runtime.autocast(images.device, "bf16"):
            losses = functional_call(self.objective, dict(zip(self.names, self.copies)), (images, tokens),
                                     strict=False)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for master, copy in zip(self.masters, self.copies):  # autocast's backward casts each bf16 gradient alike
            master.grad, copy.grad = copy.grad.float(), None
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(self.objective.parameters(), grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            self.objective.model.logit_scale.clamp_(0, recipe.LOGIT_SCALE_MAX)
            torch._foreach_copy_(self.copies, self.masters)  # the refreshed bf16 copy, rounded as autocast rounds
        values = torch.stack([loss.detach(), *(v.detach() for v in losses.values())])
        return dict(zip(["loss", *losses], values.tolist()))


def contenders(cfg, tokens_of, batch_size):
    """(autocast step, bf16-copy step), each a fresh model from the same seed on the same batch."""
    out = []
    images = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    tokens = tokens_of(cfg)
    for kind in ("autocast", "bf16 copy"):
        torch.manual_seed(0)
        model = vit.CLIP(cfg).train()
        settings = train.Settings(device="cpu")
        objective = train.Objective(model)
        optimizer = recipe.make_optimizer(model, settings.lr, settings.wd, torch.device("cpu"))
        if kind == "autocast":
            out.append(lambda o=objective, p=optimizer: train.train_step(o, p, images, tokens, settings.lr,
                                                                         settings.grad_clip, precision="bf16"))
        else:
            step = Bf16Step(objective, optimizer)
            out.append(lambda s=step: s(images, tokens, settings.lr, settings.grad_clip))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=recipe.SYNTHETIC_BATCH, help="pairs per step (the chain's)")
    parser.add_argument("--check-steps", type=int, default=4, help="steps whose losses must agree bit for bit")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds; each contender's best counts")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--conditions", default="not stated (pass --conditions, e.g. 'idle machine')",
                        help="the machine's state, for the results file")
    parser.add_argument("--out", default="bf16-weights.md", help="results file name under results/")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = results.header("bf16 weight copy vs autocast's per-step casts (CPU training step)", args.conditions) + [
        f"train.train_step under bf16 autocast against the same step reading a persistent bf16 copy of the matmul "
        f"weights ({len(CAST)} kinds of tensor); batch {args.batch_size}; samples/s, the best of {args.rounds} "
        f"alternating rounds of {args.steps} steps.", "",
        "| shape | losses bit for bit (steps) | autocast | bf16 copy | ratio |", "| --- | --- | ---: | ---: | ---: |"]
    for name, (cfg, tokens_of) in profile_step.shapes(args.batch_size).items():
        first, second = contenders(cfg, tokens_of, args.batch_size)
        same = all(first() == second() for _ in range(args.check_steps))
        best = [0.0, 0.0]
        for _ in range(args.rounds):
            for i, step in enumerate((first, second)):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                best[i] = max(best[i], args.batch_size * args.steps / (time.perf_counter() - t0))
        lines.append(f"| {name} | {'yes' if same else 'NO'} ({args.check_steps}) | {best[0]:.1f} | {best[1]:.1f} | "
                     f"{best[1] / best[0]:.3f}x |")
        print(lines[-1], flush=True)
    print(f"wrote {results.write(args.out, lines)}")


if __name__ == "__main__":
    main()
