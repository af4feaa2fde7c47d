"""DDP on the CPU (gloo), as torchrun runs it: 2 processes joined through runtime.init_distributed from torchrun's
environment variables. Pinned: 2 ranks at batch b give the loss and the gradients of 1 process at batch 2b on the
same samples (CLIP loss over the global batch, FD per sample); a 2-rank train() trains like 1 process at twice the
batch, writes one checkpoint without wrapper prefixes and one set of records, keeps the ranks identical, returns
rank 0's metrics everywhere, exports an open_clip local-dir (that open_clip loads, when installed), and resumes
exactly on every rank; a 2-stage chain under the same group completes with one report, which a rerun by one process
is refused to rewrite, and is refused by every rank on a folder that another run holds."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import chain
import data
import interop
import recipe
import runtime
import train
import vit
from distill import FeatureDistill

WORLD, B = 2, 4  # processes, batch per process
TINY = dict(image_size=32, patch_size=16, context_length=16, vocab_size=259, tokenizer="byte")
CHAIN = ["--sizes", "cpu-tiny,cpu-small", "--steps", "2,2", "--batch-size", str(B), "--num-samples", "32",
         "--image-size", "32", "--patch-size", "16", "--context-length", "16", "--device", "cpu", "--precision", "fp32",
         "--eval-every", "0", "--probes", "0"]  # a 2-stage chain (grow + FD), the flags of each rank


def tiny_model(seed, **overrides):
    torch.manual_seed(seed)
    return vit.CLIP(vit.config("cpu-tiny", **{**TINY, **overrides}))


def global_batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(WORLD * B, 3, 32, 32, generator=g)
    tokens = data.tokenize([f"caption {i} of the batch" for i in range(WORLD * B)], 16)
    return images, tokens


def one_step(rank=0, world=1):
    """Losses and gradients of one train_step on this rank's slice of the global batch, with a teacher and a
    trained projector (student embed dim 32 -> teacher 512); lr 0 and no clipping: the raw gradients."""
    student, distill = tiny_model(0, embed_dim=32), FeatureDistill(32, 512)
    objective = train.Objective(student, distill)
    wrapped = DDP(objective) if world > 1 else objective
    images, tokens = (x.chunk(world)[rank] for x in global_batch())
    optimizer = recipe.make_optimizer(student, recipe.SYNTHETIC_LR, recipe.WEIGHT_DECAY, torch.device("cpu"), distill)
    losses = train.train_step(wrapped, optimizer, images, tokens, 0.0, 0.0, tiny_model(1), precision="fp32")
    return losses, {n: p.grad.clone() for n, p in objective.named_parameters()}


def settings(**kw):  # 32 samples: 4 steps of a global batch of 8
    return train.Settings(**{**dict(steps=4, batch_size=B, warmup=2, num_samples=32, device="cpu", precision="fp32",
                                    save_every=2, log_every=1, eval_every=0, probes=0), **kw})  # fp32: compared to 1e-4


class Interrupt(Exception):
    pass


def interrupted_run(out, n_batches):
    """train() that dies (on every rank) before its n-th batch, like a killed job."""
    build = data.build_train_data

    def build_interrupted(*args, **kwargs):
        train_data = build(*args, **kwargs)
        batches = train_data.batches

        def stop(epoch, start_step=0):
            for i, b in enumerate(batches(epoch, start_step)):
                if i == n_batches:
                    raise Interrupt
                yield b
        train_data.batches = stop
        return train_data
    train.data.build_train_data = build_interrupted
    try:
        train.train(tiny_model(0), settings(), out)
    except Interrupt:
        pass
    finally:
        train.data.build_train_data = build


def worker(rank, port, tmp):
    """One rank: joins the group from torchrun's variables, then runs every scenario, saving what it saw."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    runtime.init_distributed(torch.device("cpu"))
    try:
        saw = {"step": one_step(rank, WORLD)}
        model = tiny_model(0)
        saw["metrics"] = train.train(model, settings(), os.path.join(tmp, "run"))
        saw["model"] = model.state_dict()
        interrupted_run(os.path.join(tmp, "resumed"), 3)  # checkpoint at step 2, dies before step 4
        saw["resumed_from"] = torch.load(os.path.join(tmp, "resumed", "checkpoint.pt"), weights_only=True)["step"]
        model = tiny_model(0)
        train.train(model, settings(), os.path.join(tmp, "resumed"))
        saw["resumed"] = model.state_dict()
        # a 2-stage chain (grow + FD) under the same process group, as `torchrun chain.py` runs it
        saw["chain"] = chain.main([*CHAIN, "--out", os.path.join(tmp, "chain")])
        # a folder in use (rank 0 holds its lock): the chain is refused on every rank, none left waiting
        runtime.hold_out_dir(os.path.join(tmp, "busy"))
        try:
            chain.main([*CHAIN, "--out", os.path.join(tmp, "busy")])
        except SystemExit as e:
            saw["busy"] = e.code
        runtime._release()
        torch.save(saw, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        runtime.destroy_distributed()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ddp"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, tmp), nprocs=WORLD)
    return tmp, [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def test_two_ranks_at_batch_b_are_one_process_at_batch_2b(ranks):
    ref_losses, ref_grads = one_step()
    assert set(ref_losses) == {"loss", "clip_loss", "fd_loss"}
    for losses, grads in (saw["step"] for saw in ranks[1]):
        for k in ref_losses:  # train_step reports the mean over ranks: the global batch's loss
            assert losses[k] == pytest.approx(ref_losses[k], rel=1e-5), k
        assert grads.keys() == ref_grads.keys()
        for n, g in grads.items():  # the projector's too
            scale = ref_grads[n].abs().max()  # fp32 sums in another order: rounding at 1e-6 of the largest entry
            assert torch.allclose(g, ref_grads[n], rtol=1e-4, atol=1e-5 * scale), n


def test_two_rank_run_writes_once_and_trains_like_one_process_at_twice_the_batch(ranks, tmp_path):
    tmp, (saw0, saw1) = ranks
    out = os.path.join(tmp, "run")
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # rank 0 alone wrote
    for saw in (saw0, saw1):  # identical models on every rank, the one in the checkpoint
        assert all(torch.equal(saw["model"][k], v) for k, v in ckpt["model"].items())
    same = lambda metrics: {k: v for k, v in metrics.items() if k not in train.CLOCK}  # each process's own clock
    assert same(saw0["metrics"]) == same(saw1["metrics"])  # every rank returns rank 0's metrics (eval included)
    assert saw0["metrics"]["samples_seen"] == 32 and "zeroshot_top1" in saw0["metrics"]
    # the same samples through one process at batch 8: the same losses, step by step
    single = tmp_path / "single"
    model = tiny_model(0)
    train.train(model, settings(batch_size=WORLD * B), str(single))
    losses = lambda path: [r["loss"] for r in map(json.loads, open(path)) if "loss" in r]
    assert losses(os.path.join(out, "metrics.jsonl")) == pytest.approx(losses(single / "metrics.jsonl"), rel=1e-4)
    for k, v in model.state_dict().items():
        assert torch.allclose(ckpt["model"][k], v, atol=1e-5), k
    # the open_clip export holds the checkpoint's weights
    exported = interop.load_model(os.path.join(out, "open_clip")).state_dict()
    assert all(torch.equal(exported[k], v) for k, v in ckpt["model"].items())
    # one process cannot resume a two-process run exactly: refused
    with pytest.raises(ValueError, match="trained by 2 processes, not 1"):
        train.train(tiny_model(0), settings(), out)


def test_a_resumed_two_rank_run_ends_where_a_straight_one_does(ranks):
    tmp, saws = ranks
    straight = torch.load(os.path.join(tmp, "run", "checkpoint.pt"), weights_only=True)["model"]
    for saw in saws:  # every rank restored the checkpoint and ended where the uninterrupted run did
        assert saw["resumed_from"] == 2
        assert all(torch.equal(saw["resumed"][k], v) for k, v in straight.items())


def test_a_two_rank_chain_completes_with_one_report(ranks, capsys):
    tmp, (saw0, saw1) = ranks
    out = os.path.join(tmp, "chain")
    assert saw1["chain"] is None  # rank 0 alone writes the report
    report = json.load(open(os.path.join(out, "report.json")))
    assert [s["size"] for s in report["stages"]] == ["cpu-tiny", "cpu-small"]
    assert [s["samples"] for s in report["stages"]] == [2 * WORLD * B, 2 * WORLD * B]  # global batches
    for d in ("1-cpu-tiny", "2-cpu-small"):
        ckpt = torch.load(os.path.join(out, d, "checkpoint.pt"), weights_only=True)
        assert ckpt["step"] == 2 and ckpt["world_size"] == WORLD
    assert saw0["chain"]["stages"] == report["stages"]
    # rerun by one process with the same flags: refused (it would halve the ledger), the report left as it is
    with pytest.raises(SystemExit) as e:
        chain.main([*CHAIN, "--out", out])
    assert e.value.code == 2 and f"run by {WORLD} processes, not 1;" in capsys.readouterr().err
    assert json.load(open(os.path.join(out, "report.json"))) == report
    assert saw0["busy"] == saw1["busy"] == 2  # a second run on a folder in use: refused by both ranks


def test_open_clip_loads_the_export_of_a_two_rank_run(ranks):
    open_clip = pytest.importorskip("open_clip")
    out = os.path.join(ranks[0], "run")
    theirs, _, _ = open_clip.create_model_and_transforms("local-dir:" + os.path.join(out, "open_clip"))
    ours = interop.load_model(os.path.join(out, "checkpoint.pt"))
    images, tokens = global_batch()
    with torch.no_grad():
        assert torch.allclose(theirs.eval().encode_image(images), ours.eval().encode_image(images), atol=1e-5)
        assert torch.allclose(theirs.encode_text(tokens), ours.encode_text(tokens), atol=1e-5)
