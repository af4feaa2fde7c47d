"""data.py: the synthetic set, transforms, training batches, evaluation sets."""

import numpy as np
import pytest
import torch

import data

COLOUR_RGB = np.array(list(data.COLOURS.values()), dtype=np.float32)


def build(**kw):
    args = dict(tokenizer="byte", image_size=32, context_length=48, batch_size=8, workers=0, seed=0,
                num_samples=64)
    args.update(kw)
    return data.build_train_data("synthetic", **args)


# -----------------------------------------------------------------------------
# the synthetic set


def test_synthetic_is_deterministic_per_seed_and_index():
    a, ca, la = data.synthetic_sample(0, "train", 5)
    b, cb, lb = data.synthetic_sample(0, "train", 5)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and ca == cb and la == lb
    assert a.size == (32, 32) and a.mode == "RGB" and len(ca) == 5
    assert not np.array_equal(np.asarray(a), np.asarray(data.synthetic_sample(1, "train", 5)[0]))
    assert not np.array_equal(np.asarray(a), np.asarray(data.synthetic_sample(0, "retrieval", 5)[0]))
    assert data.synthetic_sample(0, "train", 3, image_size=64)[0].size == (64, 64)


def test_captions_are_short_and_name_the_label():
    for i in range(500):
        _, captions, label = data.synthetic_sample(0, "train", i)
        colour, shape = data.CLASSNAMES[label].split()
        for c in captions:
            assert len(c.encode()) <= data.SYNTHETIC_CONTEXT_LENGTH - 2  # never truncated
            assert colour in c.split() and shape in c.replace(",", "").split()


def _colour_mask(image, colour):
    """Pixels nearest to `colour` among the palette and far from grey."""
    x = np.asarray(image, dtype=np.float32)
    saturated = x.max(-1) - x.min(-1) > 40
    nearest = ((x[..., None, :] - COLOUR_RGB) ** 2).sum(-1).argmin(-1)
    return saturated & (nearest == list(data.COLOURS).index(colour))


def test_captions_describe_position_and_relation():
    """Where the coloured pixels are agrees with the caption (grid cell, or left/right/above/below)."""
    checked = 0
    for i in range(300):
        image, captions, _ = data.synthetic_sample(0, "train", i, image_size=48)
        words = captions[0].split()
        if "white" in words:
            continue
        if words[1] in data.COLOURS:  # two objects: "a c s rel [of] a c2 s2"
            c1, c2 = words[1], words[-2]
            if c1 == c2:
                continue
            ys1, xs1 = np.nonzero(_colour_mask(image, c1))
            ys2, xs2 = np.nonzero(_colour_mask(image, c2))
            dx, dy = xs1.mean() - xs2.mean(), ys1.mean() - ys2.mean()
            expected = {"left": dx < -5, "right": dx > 5, "above": dy < -5, "below": dy > 5}[words[3]]
            assert expected, captions[0]
        else:
            ys, xs = np.nonzero(_colour_mask(image, words[2]))
            col, row = int(xs.mean() * 3 // 48), int(ys.mean() * 3 // 48)
            assert data._POSITIONS[3 * row + col] in captions[0], captions[0]
        checked += 1
    assert checked > 150


def test_raw_pixels_do_not_solve_zeroshot():
    """Nearest neighbour on raw pixels, with labelled single-object pictures, is far from solving it."""
    tf = data.eval_transform(32)
    train = [data.synthetic_sample(0, "train", i, two_objects=False) for i in range(2000)]
    test = [data.synthetic_sample(0, "zeroshot", i) for i in range(480)]
    xa = torch.nn.functional.normalize(torch.stack([tf(im).flatten() for im, _, _ in train]), dim=1)
    xb = torch.nn.functional.normalize(torch.stack([tf(im).flatten() for im, _, _ in test]), dim=1)
    ya, yb = torch.tensor([y for _, _, y in train]), torch.tensor([y for _, _, y in test])
    accuracy = (ya[(xb @ xa.T).argmax(1)] == yb).float().mean().item()
    assert 1 / 48 < accuracy < 0.5


# -----------------------------------------------------------------------------
# transforms


def test_eval_transform_is_resize_crop_normalise():
    image, _, _ = data.synthetic_sample(0, "train", 0, image_size=40)
    x = data.eval_transform(40)(image)
    ref = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - torch.tensor(data.MEAN)[:, None, None]) \
        / torch.tensor(data.STD)[:, None, None]
    assert torch.allclose(x, ref, atol=1e-5)
    assert data.eval_transform(32)(image.resize((40, 60))).shape == (3, 32, 32)
    assert data.train_transform(32)(image.convert("L")).shape == (3, 32, 32)


# -----------------------------------------------------------------------------
# training batches


def test_batches_shapes_and_steps():
    td = build(num_samples=100, batch_size=8)
    assert td.num_samples == 100 and td.steps_per_epoch == 12
    batches = list(td.batches(0))
    assert len(batches) == 12
    images, tokens = batches[0]
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert tokens.shape == (8, 48) and tokens.dtype == torch.long
    assert (tokens.argmax(-1) > 0).all() and dict(td.skipped) == {}


def test_stream_is_independent_of_workers_and_resumable():
    state = torch.random.get_rng_state()
    full = list(build().batches(1))
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is not touched
    resumed = list(build(workers=2).batches(1, start_step=5))
    assert len(resumed) == len(full) - 5
    for (a, ta), (b, tb) in zip(full[5:], resumed):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    other = list(build().batches(2))
    assert not torch.equal(full[0][1], other[0][1])  # a new epoch, a new order


def test_ranks_split_each_global_batch():
    whole = list(build(batch_size=8).batches(0))
    parts = [list(build(batch_size=4, rank=r, world_size=2).batches(0)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole) == 8
    for t in range(8):
        assert torch.equal(torch.cat([parts[0][t][0], parts[1][t][0]]), whole[t][0])
        assert torch.equal(torch.cat([parts[0][t][1], parts[1][t][1]]), whole[t][1])
    seen = torch.cat([torch.cat([b[0] for b in p]) for p in parts]).flatten(1)
    assert torch.unique(seen, dim=0).shape[0] == 64  # every sample once per epoch


def test_several_captions_per_image():
    images, tokens = next(build(captions_per_image=3).batches(0))
    assert tokens.shape == (8, 3, 48)
    for row in tokens:
        assert len({tuple(t.tolist()) for t in row}) == 3  # three different paraphrases


class _Flaky:
    """A source where every third index is bad."""

    def __len__(self):
        return 30

    def load(self, index):
        if index % 3 == 0:
            raise data.BadSample("corrupt_image", str(index))
        return data.synthetic_sample(0, "train", index)[:2]


def test_bad_samples_are_replaced_and_counted():
    ds = data.Pairs(_Flaky(), data.eval_transform(32), data.get_tokenizer("byte"), 48, seed=0)
    td = data.TrainData(ds, batch_size=5, workers=0, seed=0)
    batches = list(td.batches(0))
    assert len(batches) == 6 and all(b[0].shape[0] == 5 for b in batches)
    assert td.skipped["corrupt_image"] >= 10  # each of the 10 bad indices was met at least once
    expected = {tuple(data.get_tokenizer("byte")(data.synthetic_sample(0, "train", i)[1], 48)[j].tolist())
                for i in range(30) if i % 3 for j in range(5)}
    assert all(tuple(t.tolist()) in expected for b in batches for t in b[1])


# -----------------------------------------------------------------------------
# evaluation sets


def test_eval_sets():
    ev = data.build_eval_sets("synthetic", tokenizer="byte", image_size=32, context_length=48)
    zs, rt = ev["zeroshot"], ev["retrieval"]
    labels = torch.cat([y for _, y in zs["batches"]])
    assert torch.equal(torch.bincount(labels), torch.full((48,), 20))
    assert zs["tokens"].shape == (48, len(zs["templates"]), 48) and len(zs["classnames"]) == 48
    assert zs["batches"][0][0].shape[1:] == (3, 32, 32)
    images = torch.cat([x for x, _ in rt["batches"]])
    tokens = torch.cat([t for _, t in rt["batches"]])
    assert images.shape == (500, 3, 32, 32) and tokens.shape == (500, 5, 48)
    train_first = data.eval_transform(32)(data.synthetic_sample(0, "train", 0)[0])
    assert not torch.equal(images[0], train_first)  # held out
