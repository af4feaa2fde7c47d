"""Tests of train.py: optimizer groups, schedule, clamp, gradients, precision and compile switches, end-to-end run, exact
resume, NaN stop, --init-from / --teacher. DDP: tests/test_ddp.py; the evaluation metrics: tests/test_evaluate.py."""
import dataclasses
import functools
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import data
import grow
import interop
import recipe
import runtime
import train
import vit
from distill import FeatureDistill

TINY = dict(image_size=32, patch_size=16, context_length=16, vocab_size=259, tokenizer="byte")


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return vit.CLIP(vit.config("cpu-tiny", **{**TINY, **overrides}))


def tiny_settings(**overrides):
    return train.Settings(**{**dict(steps=4, batch_size=8, warmup=2, lr=1e-3, num_samples=64, device="cpu",
                                    precision="fp32", save_every=2, log_every=1, probes=0), **overrides})


def make_optimizer(model, settings, distill=None):
    return recipe.make_optimizer(model, settings.lr, settings.wd, torch.device("cpu"), distill)


def batch(cfg, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = data.tokenize([f"caption number {i}" for i in range(n)], cfg.context_length)
    return images, tokens


# -----------------------------------------------------------------------------
# optimisation


class Spy(FeatureDistill):
    """FeatureDistill that records whether the teacher features it gets carry an autograd graph."""

    def forward(self, s_img, s_txt, t_img, t_txt):
        self.teacher_graph = t_img.requires_grad or t_txt.requires_grad
        return super().forward(s_img, s_txt, t_img, t_txt)


def test_every_parameter_gets_a_gradient_and_the_teacher_none():
    student, teacher = tiny_model(0, embed_dim=32), tiny_model(1)
    distill = Spy(32, teacher.cfg.embed_dim)  # different dims: a trained projector
    objective = train.Objective(student, distill)
    optimizer = make_optimizer(student, tiny_settings(), distill)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses = train.train_step(objective, optimizer, *batch(student.cfg), 1e-3, 1.0, teacher)
    assert set(losses) == {"loss", "clip_loss", "fd_loss"} and losses["fd_loss"] > 0
    assert losses["loss"] == pytest.approx(losses["clip_loss"] + losses["fd_loss"])
    for name, p in objective.named_parameters():  # the student's and the projector's
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all(), name
    assert distill.teacher_graph is False  # the teacher ran under no_grad
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


def test_param_groups_follow_open_clip():
    model = tiny_model()
    distill = FeatureDistill(512, 256)
    groups = recipe.param_groups(model, 0.1, distill)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1]
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    assert [id(p) for p in groups[2]["params"]] == [id(p) for p in distill.parameters()]
    # independent restatement: matrices decay, except nothing; gains, biases, class token and logit_scale do not
    for n in ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
              "positional_embedding", "text_projection", "transformer.resblocks.0.attn.in_proj_weight",
              "visual.transformer.resblocks.1.mlp.c_fc.weight", "transformer.resblocks.1.attn.out_proj.weight"):
        assert n in decay, n
    for n in ("visual.class_embedding", "logit_scale", "visual.ln_pre.weight", "visual.ln_post.bias", "ln_final.weight",
              "transformer.resblocks.0.ln_1.weight", "transformer.resblocks.0.attn.in_proj_bias",
              "visual.transformer.resblocks.0.mlp.c_proj.bias"):
        assert n in no_decay, n
    assert len(recipe.param_groups(model, 0.1, FeatureDistill(512, 512))) == 2  # identity projector: no group


def test_lr_schedule_is_open_clips_warmup_and_cosine():
    total, warmup, lr = 100, 10, 2.0
    got = [recipe.lr_at(s, total, warmup, lr) for s in range(total)]
    assert got[:10] == pytest.approx([lr * (s + 1) / warmup for s in range(10)])
    assert got[10] == pytest.approx(lr)  # cosine starts at the peak
    assert got[55] == pytest.approx(lr / 2)  # halfway through the decay
    assert got[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)) * lr)
    assert all(a >= b for a, b in zip(got[10:], got[11:]))


@pytest.mark.parametrize("start,expected", [(10.0, math.log(100)), (-1.0, 0.0)])
def test_logit_scale_is_clamped_after_each_step(start, expected):
    model = tiny_model()
    with torch.no_grad():
        model.logit_scale.fill_(start)
    objective = train.Objective(model)
    optimizer = make_optimizer(model, tiny_settings())
    images, tokens = batch(model.cfg)
    train.train_step(objective, optimizer, images, tokens, 1e-4, 1.0)
    assert model.logit_scale.item() == pytest.approx(expected)


def test_several_captions_per_image_keep_their_slots():
    model = tiny_model()
    images, tokens = batch(model.cfg, n=6)
    tokens = tokens.view(3, 2, -1)  # 3 images x 2 captions
    assert torch.allclose(train.encode_text(model, tokens)[1, 0], model.encode_text(tokens[1])[0], atol=1e-6)


# -----------------------------------------------------------------------------
# precision and compile switches


def step_losses_and_grads(precision, scaler=train.NO_SCALER, grad_clip=0.0):
    model = tiny_model()
    objective = train.Objective(model)
    optimizer = make_optimizer(model, tiny_settings())
    losses = train.train_step(objective, optimizer, *batch(model.cfg), 0.0, grad_clip, precision=precision, scaler=scaler)
    return losses, torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_steps_run_on_the_cpu_with_fp32_losses(precision):
    model = tiny_model()
    images, tokens = batch(model.cfg)
    with runtime.autocast(torch.device("cpu"), precision):
        assert model.encode_image(images).dtype == runtime.DTYPES[precision]  # autocast is on
        losses = train.Objective(model)(images, tokens)
    assert losses["clip_loss"].dtype == torch.float32  # logits and losses in fp32
    ref_losses, ref_grads = step_losses_and_grads("fp32")
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    got_losses, got_grads = step_losses_and_grads(precision, scaler, grad_clip=1e-3)
    assert got_losses["loss"] == pytest.approx(ref_losses["loss"], abs=0.05)
    # clipped to exactly the bound: fp16's gradients were scaled up for backward (by 2^16) and unscaled before
    # clipping; without the scaler in backward, or with clipping before unscaling, the norm would be off by 2^16
    assert ref_grads.norm() > 1e-2 and got_grads.norm().item() == pytest.approx(1e-3, rel=1e-3)
    assert torch.cosine_similarity(got_grads, ref_grads, dim=0) > 0.99


def test_compile_keeps_plain_state_dict_keys_and_the_same_training(tmp_path, monkeypatch):
    # the eager backend traces the towers with dynamo as --compile does, without inductor's minute of C++ builds on
    # a CPU (benchmarks/gpu_check.py compiles for real on CUDA)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    compiled, plain = tiny_model(), tiny_model()
    train.train(compiled, tiny_settings(compile=True, eval_every=0), str(tmp_path / "compiled"))
    train.train(plain, tiny_settings(eval_every=0), str(tmp_path / "plain"))
    assert compiled.visual._compiled_call_impl is not None  # it did run compiled
    ckpt = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)
    assert list(ckpt["model"]) == list(plain.state_dict())  # no _orig_mod.
    for k, v in plain.state_dict().items():
        assert torch.allclose(ckpt["model"][k], v, atol=1e-5), k


# -----------------------------------------------------------------------------
# end to end: run, checkpoint, resume, NaN stop, command-line errors


def test_tiny_run_writes_checkpoint_metrics_and_config(tmp_path):
    model = tiny_model()
    metrics = train.train(model, tiny_settings(steps=6, num_samples=32), str(tmp_path))  # 4 steps per epoch
    assert metrics["step"] == 6 and metrics["samples_seen"] == 48
    assert {"loss", "clip_loss", "zeroshot_top1", "zeroshot_top5", "i2t_R@1", "t2i_R@10"} <= set(metrics)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["config"] == model.cfg.to_dict() and ckpt["distill"] is None
    assert all(torch.equal(ckpt["model"][k], v) for k, v in model.state_dict().items())
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "zeroshot_top1" in r] == [4, 6]  # after epoch 1, and at the end
    assert records[-1]["zeroshot_top1"] == metrics["zeroshot_top1"]
    config = json.load(open(tmp_path / "config.json"))
    assert config["model"] == model.cfg.to_dict() and config["settings"]["steps"] == 6 and config["git"]
    assert not os.path.exists(tmp_path / "checkpoint.pt.tmp")
    exported = interop.load_model(tmp_path / "open_clip")  # the open_clip local-dir export
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in model.state_dict().items())
    # a checkpoint of another model or another data stream is refused, not silently resumed
    with pytest.raises(ValueError, match="another config"):
        train.train(tiny_model(patch_size=8), tiny_settings(steps=6, num_samples=32), str(tmp_path))
    with pytest.raises(ValueError, match="batch_size=8"):
        train.train(tiny_model(), tiny_settings(steps=6, num_samples=32, batch_size=4), str(tmp_path))



def test_the_weight_average_is_the_trained_model(tmp_path, monkeypatch):
    # brute force: the average of the initial weights and of the weights after every step, decay 1 - 1 / (0.5 x 6)
    model = tiny_model()
    seen = [{k: v.clone() for k, v in model.state_dict().items()}]
    step = train.train_step

    def spy(objective, *args, **kwargs):
        losses = step(objective, *args, **kwargs)
        seen.append({k: v.clone() for k, v in objective.model.state_dict().items()})
        return losses
    monkeypatch.setattr(train, "train_step", spy)
    settings = tiny_settings(steps=6, num_samples=32, ema=0.5, eval_every=0, eval_steps=2)
    metrics = train.train(model, settings, str(tmp_path))
    decay = 1 - 1 / (0.5 * 6)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            average = seen[0][k].double()
            for weights in seen[1:]:
                average = decay * average + (1 - decay) * weights[k].double()
            torch.testing.assert_close(v.double(), average, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.visual.conv1.weight, seen[-1]["visual.conv1.weight"])  # not the last weights
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in seen[-1].items())  # the checkpoint keeps both
    for path in (tmp_path, tmp_path / "open_clip"):  # what --init-from, --teacher and the export read: the average
        state, _ = interop.load_state_dict_any(path)
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records if "zeroshot_top1" in r] == [0, 2, 4, 6]  # --eval-steps 2, from step 0
    assert records[-1]["zeroshot_top1"] == metrics["zeroshot_top1"]


def test_resume_refuses_another_worker_count_for_shards_only(tmp_path):
    from test_data import make_shards  # img2dataset's layout, 3 shards x 8 samples
    shards = make_shards(tmp_path / "shards")
    settings = tiny_settings(steps=2, num_samples=0, batch_size=4, eval_every=0, data=str(shards))
    train.train(tiny_model(), settings, str(tmp_path / "run"))
    more = dataclasses.replace(settings, workers=1)  # shards: the batch order depends on the workers
    with pytest.raises(ValueError, match=r"workers=0, not 1 \(the batch order of shards depends on it\)"):
        train.train(tiny_model(), more, str(tmp_path / "run"))
    synthetic = tiny_settings(steps=2, eval_every=0)  # map-style sources: the order does not depend on them
    train.train(tiny_model(), synthetic, str(tmp_path / "syn"))
    assert train.train(tiny_model(), dataclasses.replace(synthetic, workers=1), str(tmp_path / "syn"))["step"] == 2

class Interrupt(Exception):
    pass


def interrupt_after(monkeypatch, n_batches):
    """Make the next train() fail like a killed process after n_batches batches."""
    build = data.build_train_data

    def build_interrupted(*args, **kwargs):
        train_data, batches = build(*args, **kwargs), 0

        def batches_then_stop(epoch, start_step=0):
            nonlocal batches
            for b in real_batches(epoch, start_step):
                if batches == n_batches:
                    raise Interrupt
                batches += 1
                yield b
        real_batches, train_data.batches = train_data.batches, batches_then_stop
        return train_data
    monkeypatch.setattr(train.data, "build_train_data", build_interrupted)


def test_resume_is_exact(tmp_path, monkeypatch):
    # with a teacher and a trained projector, and across an epoch boundary (64 samples / batch 8 = 8 steps)
    settings = tiny_settings(steps=10, save_every=3, num_samples=64, eval_every=0, ema=0.3)  # the average resumes too

    def run(out):
        student, teacher = tiny_model(0, embed_dim=32), tiny_model(1)
        distill = FeatureDistill(32, 512)
        train.train(student, settings, str(out), teacher=teacher, distill=distill)
        return student, distill

    straight, straight_fd = run(tmp_path / "a")
    interrupt_after(monkeypatch, 7)
    with pytest.raises(Interrupt):
        run(tmp_path / "b")
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 6
    monkeypatch.undo()
    resumed, resumed_fd = run(tmp_path / "b")
    for a, b in ((straight, resumed), (straight_fd, resumed_fd)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    losses = lambda out: [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if "loss" in line]
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # one record per step, replayed steps not doubled


class NaNAt(nn.Module):
    """A distillation loss that turns NaN at its n-th call."""

    def __init__(self, n):
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, s_img, s_txt, t_img, t_txt):
        self.calls += 1
        return (s_img.sum() + s_txt.sum()) * (float("nan") if self.calls == self.n else 0.0)


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path):
    model = tiny_model()
    with pytest.raises(FloatingPointError, match="step 5"):
        train.train(model, tiny_settings(steps=8), str(tmp_path), teacher=tiny_model(1), distill=NaNAt(5))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_teacher_must_see_the_same_batches(tmp_path):
    with pytest.raises(ValueError, match="context_length 24"):
        train.train(tiny_model(), tiny_settings(), str(tmp_path), teacher=tiny_model(1, context_length=24),
                    distill=FeatureDistill(512, 512))
    assert not os.path.exists(tmp_path / "checkpoint.pt")


# -----------------------------------------------------------------------------
# --init-from and --teacher


def test_initialise_loads_the_same_size_and_grows_a_smaller_one():
    small = tiny_model(3)
    same = tiny_model(4)
    interop.initialise(same, small.state_dict(), small.cfg)
    assert all(torch.equal(same.state_dict()[k], v) for k, v in small.state_dict().items())
    torch.manual_seed(5)
    big = vit.CLIP(vit.config("cpu-small", **TINY))
    fresh = big.state_dict()
    interop.initialise(big, small.state_dict(), small.cfg, method="inherit", seed=0)
    expected = grow.grow(small.state_dict(), fresh, small.cfg, big.cfg, method="inherit", seed=0)
    assert all(torch.equal(big.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(ValueError, match=r"\(cpu-small\) is larger than this one \(cpu-tiny\)"):
        interop.initialise(tiny_model(), big.state_dict(), big.cfg)
    with pytest.raises(ValueError, match="patch_size is 8, the model's 16"):
        interop.initialise(tiny_model(), tiny_model(patch_size=8).state_dict(), tiny_model(patch_size=8).cfg)


def test_cli_grows_from_an_open_clip_style_checkpoint_and_distils_towards_it(tmp_path):
    # a DDP-saved bare state dict of a trained-looking cpu-tiny (byte vocabulary: inferred tokenizer "byte")
    small = tiny_model(3)
    path = tmp_path / "small.pt"
    torch.save({"module." + k: v for k, v in small.state_dict().items()}, path)
    out = tmp_path / "big"
    train.main(["--size", "cpu-small", "--init-from", str(path), "--teacher", str(path), "--out", str(out),
                "--steps", "2", "--batch-size", "8", "--num-samples", "16", "--lr", "1e-12", "--eval-every", "0", "--log-every", "1",
                "--device", "cpu", "--precision", "fp32", "--seed", "7", "--probes", "0"])
    # the data shape came from the checkpoint; the start was the lossless growth (function-preserving), so with
    # a vanishing lr the student still computes its teacher's features: FD ~ 0
    cfg = vit.CLIPConfig.from_dict(json.load(open(out / "config.json"))["model"])
    assert (cfg.image_size, cfg.patch_size, cfg.context_length, cfg.tokenizer) == (32, 16, 16, "byte")
    records = [json.loads(line) for line in open(out / "metrics.jsonl") if "fd_loss" in line]
    assert len(records) == 2 and all(r["fd_loss"] < 1e-6 for r in records)
    torch.manual_seed(7)
    grown = grow.grow(small.state_dict(), vit.CLIP(cfg).state_dict(), small.cfg, cfg, seed=7)
    trained = interop.load_model(out / "open_clip").state_dict()
    assert all(torch.allclose(trained[k], v, atol=1e-6) for k, v in grown.items())


@pytest.mark.parametrize("argv,culprit", [
    (["--size", "huge"], "cpu-tiny"),
    (["--batch-size", "0"], "--batch-size"),
    (["--steps", "-3"], "--steps"),
    (["--lr", "0"], "--lr"),
    (["--data", "/nonexistent/train.csv", "--tokenizer", "byte"], "/nonexistent/train.csv"),
    (["--resume", "/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt"),
    (["--zeroshot-data", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
    (["--precision", "fp8"], "--precision fp8"),
    (["--init-from", "/nonexistent/model.pt"], "/nonexistent/model.pt"),
    (["--teacher", "/nonexistent/teacher.pt"], "/nonexistent/teacher.pt"),
])
def test_bad_input_is_one_line_before_any_work(argv, culprit, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--out", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and culprit in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "run")
