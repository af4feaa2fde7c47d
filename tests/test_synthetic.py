"""synthetic.py: the hash, pictures, captions, training batches and evaluation sets of the embedded synthetic set."""

import itertools
import math

import pytest
import torch

import synthetic
import vit
from tokenizer import get_tokenizer

BYTE = get_tokenizer("byte")
C = synthetic.CONTEXT_LENGTH


def train_data(**kw):
    args = dict(num_samples=96, batch_size=8, seed=0, tokenizer=BYTE)
    args.update(kw)
    return synthetic.TrainData(**args)


def unnormalise(images):
    mean = torch.tensor(vit.MEAN)[:, None, None]
    std = torch.tensor(vit.STD)[:, None, None]
    return images * std + mean  # (B, 3, H, W) in [0, 1], give or take the noise


# -----------------------------------------------------------------------------
# the hash


def test_hash_matches_a_plain_python_reference_and_is_uniform():
    def mix(h):  # the same function on Python integers
        h ^= h >> 16
        h = (h * 0x7FEB352D) % 2**32
        h ^= h >> 15
        h = (h * 0x6A5D39E9) % 2**32
        return h ^ (h >> 16)

    index = torch.tensor([0, 1, 2, 12345, 2**31 + 7, 2**32 - 1])
    expected = []
    for i in index.tolist():
        h = 0x9E3779B9
        for w in (3, 1, i):
            h = mix(h ^ w)
        expected.append(h)
    assert synthetic.hash32(3, 1, index).tolist() == expected
    h = synthetic.hash32(0, torch.arange(100_000))
    assert len(h.unique()) == 100_000  # a bijection of the last word
    u = synthetic.uniform(h)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert torch.equal(u, u.double().float())  # 24-bit fractions: exact in float32


# -----------------------------------------------------------------------------
# pictures


def test_a_picture_does_not_depend_on_its_batch():
    index = torch.tensor([5, 77, 3, 150])
    crop = synthetic.view(0, 2, index, augment=True)
    alone = torch.cat([synthetic.render(synthetic.scene(0, "train", index[i:i + 1]),
                                        [c[i:i + 1] for c in crop]) for i in range(4)])
    batch = torch.arange(200)
    crop_all = synthetic.view(0, 2, batch, augment=True)
    together = synthetic.render(synthetic.scene(0, "train", batch), crop_all)[index]
    assert torch.allclose(alone, together, atol=1e-5)
    again = synthetic.render(synthetic.scene(0, "train", index), crop)
    assert torch.equal(again, synthetic.render(synthetic.scene(0, "train", index), crop))  # deterministic
    other = synthetic.render(synthetic.scene(1, "train", index), crop)  # another seed, other pictures
    assert (other - again).abs().amax(dim=(1, 2, 3)).min() > 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_draw_the_same_pictures_and_tokens():
    data = {device: train_data(device=device, captions_per_image=2) for device in ("cpu", "cuda")}
    for (x, t), (y, u) in zip(data["cpu"].batches(1), data["cuda"].batches(1)):
        assert torch.allclose(x, y.cpu(), atol=1e-4) and torch.equal(t, u.cpu())


def test_pictures_show_their_attributes():
    """Colour at the object's centre, the object where its position says, of its size."""
    images, attrs = synthetic.pictures(0, "probe-test", 300)
    rgb = unnormalise(images)
    palette = torch.tensor(list(synthetic.COLOURS.values()))
    one = (attrs["count"] == 1).nonzero()[:, 0]
    S = synthetic.IMAGE_SIZE
    checked = 0
    for i in one.tolist():
        row, col = divmod(int(attrs["position"][i, 0]), 3)
        cx, cy = synthetic.LATTICE[col] * S, synthetic.LATTICE[row] * S
        assert abs(attrs["cx"][i, 0] * S - cx) < 1e-3 + synthetic.JITTER * S
        name = synthetic.SHAPES_IN_ORDER[int(attrs["shape"][i, 0])]
        x = int(cx + (0.75 * float(attrs["radius"][i, 0]) * S if name == "ring" else 0))  # on the ring, not in its hole
        patch = rgb[i, :, int(cy) - 1:int(cy) + 1, x - 1:x + 1].mean(dim=(1, 2))  # 4 pixels of the object
        assert ((palette - patch) ** 2).sum(1).argmin() == attrs["colour"][i, 0]
        # a pixel is the object's when nearer its colour than the background's there (a plane through the corners)
        corner = [rgb[i, :, a:a + 2, b:b + 2].mean(dim=(1, 2)) for a in (0, S - 2) for b in (0, S - 2)]
        t = (torch.arange(S) + 0.5) / S
        top = corner[0][:, None] + (corner[1] - corner[0])[:, None] * t  # (3, W)
        bottom = corner[2][:, None] + (corner[3] - corner[2])[:, None] * t
        background = top[:, None, :] + (bottom - top)[:, None, :] * t[:, None]  # (3, H, W)
        mask = ((rgb[i] - patch[:, None, None]).norm(dim=0) < (rgb[i] - background).norm(dim=0)).float()
        ys, xs = mask.nonzero(as_tuple=True)
        assert abs(xs.float().mean() + 0.5 - cx) < 1.5 and abs(ys.float().mean() + 0.5 - cy) < 1.5
        radius = attrs["radius"][i, 0] * S
        area = shape_area(name, radius)
        assert abs(mask.sum() - area) < 0.25 * area + 2 * math.sqrt(area), (i, mask.sum(), area)
        checked += 1
    assert checked > 150


def shape_area(name, radius):
    """The analytic area of a shape of object radius `radius` (its geometry restated independently of SHAPES)."""
    def polygon(n):  # regular n-gon of circumradius 1
        return n / 2 * math.sin(2 * math.pi / n)

    unit = {"circle": polygon(64), "triangle": polygon(3), "square": polygon(4), "pentagon": polygon(5),
            "hexagon": polygon(6),
            "ring": polygon(64) - 64 * 0.5 ** 2 * math.tan(math.pi / 64),  # less a 64-gon hole of apothem 1/2
            "star": 5 * 0.45 * math.sin(math.pi / 5),  # 10 triangles (centre, tip, inner vertex at 0.45)
            "cross": 8 * 0.32 - 4 * 0.32 ** 2}[name]  # two 2 x 0.64 bars, their 0.64 x 0.64 overlap once
    return unit * (radius * synthetic.SHAPES[name][2]) ** 2


def test_coverage_integrates_to_the_analytic_area():
    n = 256  # a fine grid: coverage of one large shape, pixel = 1/n
    grid = (torch.arange(n) + 0.5) / n - 0.5
    for s, name in enumerate(synthetic.SHAPES):
        for angle in (0.0, 0.3):
            alpha = synthetic.coverage(grid[None, None, :], grid[None, :, None], torch.tensor([s]),
                                       torch.tensor([0.4]), torch.tensor([angle]), torch.tensor([1 / n]))
            area = alpha.sum().item() / n ** 2
            assert abs(area - shape_area(name, 0.4)) < 0.01 * shape_area(name, 0.4), name
            assert alpha.min() >= 0 and alpha.max() <= 1


def full_frame_render(attrs, crop, image_size):
    """synthetic.render as it was before its windows: every shape's coverage over the whole picture (brute force)."""
    t = synthetic._tables(attrs["cx"].device, image_size)
    x0, y0, w, h = crop
    B = len(x0)
    grid = (torch.arange(image_size) + 0.5) / image_size
    X = (x0[:, None] + w[:, None] * grid)[:, None, :]
    Y = (y0[:, None] + h[:, None] * grid)[:, :, None]
    pixel = (w * h).sqrt() / image_size
    scale, shift = (1 / t["std"])[:, None, None], (-t["mean"] / t["std"])[:, None, None]
    background = attrs["background"]
    grey, slope = 0.25 + 0.35 * background[:, 0, None, None], 0.25 * (background[:, 1, None, None] - 0.5)
    grey = (grey + slope * (X - 0.5)) + slope * (Y - 0.5)
    image = torch.addcmul(shift, grey[:, None], scale)
    second = (attrs["count"] > 1).nonzero()[:, 0]
    picture = torch.cat([torch.arange(B), second])
    slot = torch.cat([torch.zeros(B, dtype=torch.long), torch.ones_like(second)])
    alpha = synthetic.coverage(X[picture] - attrs["cx"][picture, slot, None, None],
                               Y[picture] - attrs["cy"][picture, slot, None, None], attrs["shape"][picture, slot],
                               attrs["radius"][picture, slot], attrs["angle"][picture, slot], pixel[picture])
    tint = attrs["tint"].view(B, 2, 3)[picture, slot]
    rgb = t["colours"][attrs["colour"][picture, slot]] + synthetic.COLOUR_JITTER * (2 * tint - 1)
    rgb = torch.addcmul(shift, rgb[:, :, None, None], scale)
    image = torch.lerp(image, rgb[:B], alpha[:B, None])
    image[second] = torch.lerp(image[second], rgb[B:], alpha[B:, None])
    noise = t["noise"][synthetic.pick(background[:, 2], synthetic.NOISE_TILES)]
    return image.addcmul_(noise[:, None], synthetic.NOISE * scale)


@pytest.mark.parametrize("threads", [1, 2])
def test_windowed_pictures_are_the_full_frame_pictures_bit_for_bit(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # a group of windows is padded to the thread count: both paths, same bits
    try:
        for seed, start, n, split in ((0, 0, 1, "train"), (1, 40, 7, "train"), (2, 500, 160, "train"),
                                      (3, 0, 64, "zeroshot"), (0, 9, 100, "probe-test")):
            index = torch.arange(start, start + n)
            attrs = synthetic.scene(seed, split, index)
            for augment, size in ((True, 32), (False, 32), (True, 48), (True, 64)):
                crop = synthetic.view(seed, 5, index, augment)
                assert torch.equal(synthetic.render(attrs, crop, size), full_frame_render(attrs, crop, size)), \
                    (seed, split, augment, size)
    finally:
        torch.set_num_threads(before)


def test_augmentation_is_a_mild_crop_seeded_per_epoch_and_index():
    index = torch.arange(500)
    x0, y0, w, h = synthetic.view(0, 3, index, augment=True)
    assert ((w * h > 0.9 - 1e-6) | (w == 1) | (h == 1)).all() and (w <= 1).all() and (h <= 1).all()
    assert (x0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 >= 0).all() and (y0 + h <= 1 + 1e-6).all()
    assert not torch.equal(x0, synthetic.view(0, 4, index, augment=True)[0])
    assert [c.tolist() for c in synthetic.view(0, 3, index[:5], augment=False)] == [[0.0] * 5, [0.0] * 5,
                                                                                    [1.0] * 5, [1.0] * 5]


# -----------------------------------------------------------------------------
# captions


def all_captions():
    """Every caption the set can write: each template with every combination of its fields' values."""
    for templates in (synthetic.ONE, synthetic.TWO):
        for template in templates:
            names = [w[1:-1] for w in template.split() if w.startswith("{")]
            for values in itertools.product(*(synthetic.FIELD_VALUES[n] for n in names)):
                yield template.format(**dict(zip(names, values)))


def test_every_caption_fits_the_context():
    longest = max(all_captions(), key=lambda c: len(BYTE.encode(c)))
    assert len(BYTE.encode(longest)) + 2 <= C, longest  # SOT + caption + EOT: never truncated
    assert sum(1 for _ in all_captions()) > 1000


class WordTokenizer:
    """A tokenizer of tokenizer.py's interface whose ids are whole words (no separator between them)."""
    name = "words"

    def __init__(self):
        words = sorted({w for c in all_captions() for w in c.split()} | {"a", "b"})
        self.ids = {w: i + 1 for i, w in enumerate(words)}
        self.sot, self.eot = len(words) + 1, len(words) + 2

    def encode(self, text):
        return [self.ids[w] for w in text.split()]

    def __call__(self, texts, context_length):
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            seq = [self.sot] + self.encode(t) + [self.eot]
            out[i, :len(seq)] = torch.tensor(seq)
        return out


@pytest.mark.parametrize("tok", [BYTE, WordTokenizer()], ids=["byte", "words"])
def test_tokens_are_the_tokenizers_tokens_of_the_caption_text(tok):
    attrs = synthetic.scene(0, "train", torch.arange(300))
    captions = synthetic.Captions(tok, C, "cpu")
    for template in range(len(synthetic.ONE) * len(synthetic.TWO)):
        tokens = captions(attrs, torch.full((300,), template))
        texts = [synthetic.caption_text(attrs, i, template) for i in range(300)]
        assert torch.equal(tokens, tok(texts, C)), template


def test_labels_agree_with_captions():
    ev = synthetic.build_eval_sets(BYTE, probe_sizes=(200, 200), retrieval_size=40, zeroshot_per_class=2)
    labels = torch.cat([y for _, y in ev["zeroshot"]["batches"]])
    n = len(synthetic.CLASSNAMES)
    assert n >= 48 and torch.equal(labels.bincount(), torch.full((n,), 2))  # balanced
    attrs = synthetic.scene(0, "zeroshot", torch.arange(len(labels)))
    for i in range(len(labels)):
        assert synthetic.caption_text(attrs, i, synthetic.ONE.index("a {colour} {shape}")) == \
            "a " + synthetic.CLASSNAMES[labels[i]]
    attrs = synthetic.scene(0, "probe-test", torch.arange(200))
    probe = ev["probes"]["test"][1]
    for i in range(200):
        text = " ".join(synthetic.caption_text(attrs, i, t) for t in range(len(synthetic.ONE) * len(synthetic.TWO)))
        for name, values in synthetic.ATTRIBUTES.items():
            label = int(probe[name][i])
            if name == "count":
                assert label == int(attrs["count"][i]) - 1
            elif label >= 0:
                assert values[label] in text, (name, values[label], text)
    prompts = ev["zeroshot"]["tokens"]
    assert prompts.shape == (n, len(synthetic.TEMPLATES), C)
    assert torch.equal(prompts[3, 0], BYTE(["a " + synthetic.CLASSNAMES[3]], C)[0])


# -----------------------------------------------------------------------------
# training batches


def test_batches_shapes_and_steps():
    data = train_data(num_samples=100)
    assert data.num_samples == 100 and data.steps_per_epoch == 12 and dict(data.skipped) == {}
    batches = list(data.batches(0))
    assert len(batches) == 12
    images, tokens = batches[0]
    assert images.shape == (8, 3, synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE) and images.dtype == torch.float32
    assert tokens.shape == (8, C) and tokens.dtype == torch.long and (tokens[:, 0] == BYTE.sot).all()
    images, tokens = next(train_data(captions_per_image=3).batches(0))
    assert tokens.shape == (8, 3, C)
    assert all(len({tuple(t.tolist()) for t in tokens[i]}) == 3 for i in range(8))  # 3 different paraphrases
    with pytest.raises(ValueError, match="no batch"):
        train_data(num_samples=7)


def test_an_epoch_is_a_permutation_drawn_from_seed_and_epoch():
    data = train_data()
    order = data.order(0)
    assert sorted(order.tolist()) == list(range(96))
    assert torch.equal(order, train_data().order(0))
    assert not torch.equal(order, data.order(1)) and not torch.equal(order, train_data(seed=1).order(0))


def test_ranks_take_their_slice_of_each_global_batch():
    whole = list(train_data(batch_size=8).batches(0))
    ranks = [list(train_data(batch_size=4, rank=r, world_size=2).batches(0)) for r in range(2)]
    assert len(whole) == len(ranks[0]) == 12
    for (x, t), (x0, t0), (x1, t1) in zip(whole, *ranks):
        assert torch.allclose(x, torch.cat([x0, x1]), atol=1e-5) and torch.equal(t, torch.cat([t0, t1]))


def test_a_resumed_epoch_is_the_tail_of_the_full_one_and_the_rng_is_untouched():
    state = torch.random.get_rng_state()
    full = list(train_data().batches(2))
    synthetic.build_eval_sets(BYTE, probe_sizes=(10, 10), retrieval_size=10, zeroshot_per_class=1)
    assert torch.equal(state, torch.random.get_rng_state())
    tail = list(train_data().batches(2, start_step=5))
    assert len(tail) == len(full) - 5
    for (x, t), (y, u) in zip(full[5:], tail):
        assert torch.equal(x, y) and torch.equal(t, u)
    other = next(train_data().batches(3))  # another epoch: another order and augmentation
    assert not torch.equal(other[0], full[0][0])


def test_eval_sets_are_held_out():
    ev = synthetic.build_eval_sets(BYTE, probe_sizes=(30, 20), retrieval_size=50, zeroshot_per_class=1)
    images, tokens = ev["retrieval"]["batches"][0]
    assert images.shape == (50, 3, synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE)
    assert tokens.shape == (50, synthetic.FULL_CAPTIONS, C)
    assert ev["probes"]["train"][0].shape[0] == 30 and ev["probes"]["test"][0].shape[0] == 20
    assert set(ev["probes"]["test"][1]) == set(synthetic.ATTRIBUTES)
    train_pictures, _ = synthetic.pictures(0, "train", 50)
    assert (images - train_pictures).abs().amax(dim=(1, 2, 3)).min() > 0.5  # other pictures than training's


def test_raw_pixels_do_not_solve_zeroshot():
    """Nearest neighbour on raw pixels, with 3,000 labelled training pictures, is far from solving the zero-shot task."""
    def labelled(split, n):
        images, attrs = synthetic.pictures(0, split, n)
        one = attrs["count"] == 1
        labels = attrs["colour"][:, 0] * len(synthetic.SHAPES) + attrs["shape"][:, 0]
        return torch.nn.functional.normalize(images[one].flatten(1), dim=1), labels[one]

    (xa, ya), (xb, yb) = labelled("probe-train", 3000), labelled("zeroshot", 640)
    accuracy = (ya[(xb @ xa.T).argmax(1)] == yb).float().mean().item()
    assert 1 / len(synthetic.CLASSNAMES) < accuracy < 0.5, accuracy


def test_held_out_pictures_are_rendered_once_per_process_and_score_the_same(monkeypatch):
    import evaluate  # above synthetic in the import stack: only this test needs it
    sizes = dict(zeroshot_per_class=1, retrieval_size=24, probe_sizes=(40, 20))
    synthetic._HELD_OUT.clear()
    cold = synthetic.build_eval_sets(BYTE, **sizes)
    calls = []
    monkeypatch.setattr(synthetic, "render", lambda *a, **k: calls.append(1))  # any render now would be a miss
    warm = synthetic.build_eval_sets(BYTE, **sizes)
    assert not calls and warm["probes"]["train"][0] is cold["probes"]["train"][0]
    monkeypatch.undo()
    synthetic._HELD_OUT.clear()
    fresh = synthetic.build_eval_sets(BYTE, **sizes)  # rendered again: the same pictures, the same scores
    torch.manual_seed(0)
    model = vit.CLIP(vit.config("cpu-tiny", image_size=32, patch_size=16, context_length=C, vocab_size=259,
                                tokenizer="byte"))
    assert evaluate.evaluate(model, warm, "cpu") == evaluate.evaluate(model, fresh, "cpu")
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(warm["retrieval"]["batches"], fresh["retrieval"]["batches"]))
    synthetic._HELD_OUT.clear()
