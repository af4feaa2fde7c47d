"""data.py: transforms, map-style training batches, evaluation sets (synthetic.py's set: tests/test_synthetic.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import synthetic


def picture(i, size=(32, 32)):
    """Picture i: one flat colour that encodes i, so a batch row tells which sample it came from."""
    return Image.new("RGB", size, (8 * i, 250 - 8 * i, 60))


class Colours:
    """A map-style source of n flat pictures with 5 captions each; every `bad`-th index is a bad sample."""

    def __init__(self, n=64, bad=0):
        self.n, self.bad = n, bad

    def __len__(self):
        return self.n

    def load(self, index):
        if self.bad and index % self.bad == 0:
            raise data.BadSample("corrupt_image", str(index))
        return picture(index), [f"picture {index} caption {j}" for j in range(5)]


def build(n=64, batch_size=8, workers=0, rank=0, world_size=1, captions_per_image=1, bad=0):
    item = data.Item(data.train_transform(32), data.get_tokenizer("byte"), 24, captions_per_image)
    return data.TrainData(data.Pairs(Colours(n, bad), item, seed=0), batch_size, workers, seed=0, rank=rank,
                          world_size=world_size)


# -----------------------------------------------------------------------------
# transforms


def test_eval_transform_is_resize_crop_normalise():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    x = data.eval_transform(40)(image)
    ref = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - torch.tensor(data.MEAN)[:, None, None]) \
        / torch.tensor(data.STD)[:, None, None]
    assert torch.allclose(x, ref, atol=1e-5)
    assert data.eval_transform(32)(image.resize((40, 60))).shape == (3, 32, 32)
    assert data.train_transform(32)(image.convert("L")).shape == (3, 32, 32)


# -----------------------------------------------------------------------------
# map-style training batches


def test_batches_shapes_and_steps():
    td = build(n=100, batch_size=8)
    assert td.num_samples == 100 and td.steps_per_epoch == 12
    batches = list(td.batches(0))
    assert len(batches) == 12
    images, tokens = batches[0]
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert tokens.shape == (8, 24) and tokens.dtype == torch.long
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
    seen = torch.cat([torch.cat([b[1][:, 9:11] for b in p]) for p in parts])  # the digits of "picture NN"
    assert torch.unique(seen, dim=0).shape[0] == 64  # every sample once per epoch


def test_several_captions_per_image():
    images, tokens = next(build(captions_per_image=3).batches(0))
    assert tokens.shape == (8, 3, 24)
    for row in tokens:
        assert len({tuple(t.tolist()) for t in row}) == 3  # three different captions


def test_bad_samples_are_replaced_and_counted():
    td = build(n=30, batch_size=5, bad=3)
    batches = list(td.batches(0))
    assert len(batches) == 6 and all(b[0].shape[0] == 5 for b in batches)
    assert td.skipped["corrupt_image"] >= 10  # each of the 10 bad indices was met at least once
    good = {i for i in range(30) if i % 3}
    assert all(int(bytes((t[9:11] - 1).tolist()).decode().strip()) in good for b in batches for t in b[1])  # byte ids: +1


# -----------------------------------------------------------------------------
# evaluation sets


def test_synthetic_eval_sets_through_evaluate():
    shape = data.default_shape("synthetic")
    ev = evaluate.build_eval_sets("synthetic", tokenizer="byte", image_size=shape["image_size"],
                                  context_length=shape["context_length"])
    n, C, S = len(synthetic.CLASSNAMES), shape["context_length"], shape["image_size"]
    zs, rt = ev["zeroshot"], ev["retrieval"]
    labels = torch.cat([y for _, y in zs["batches"]])
    assert n >= 48 and torch.equal(torch.bincount(labels), torch.full((n,), 20))
    assert zs["tokens"].shape == (n, len(zs["templates"]), C) and zs["classnames"] == synthetic.CLASSNAMES
    images = torch.cat([x for x, _ in rt["batches"]])
    tokens = torch.cat([t for _, t in rt["batches"]])
    assert images.shape == (500, 3, S, S) and tokens.shape == (500, synthetic.FULL_CAPTIONS, C)
    assert set(ev["probes"]["train"][1]) == set(synthetic.ATTRIBUTES)
    only_retrieval = evaluate.build_eval_sets("cc3m.csv", tokenizer="byte", image_size=S, context_length=C,
                                              val_data="synthetic")
    assert set(only_retrieval) == {"retrieval"}


# -----------------------------------------------------------------------------
# real data: files made here, in open_clip's and img2dataset's layouts

import io  # noqa: E402
import json  # noqa: E402
import tarfile  # noqa: E402


def solid(i, size=(40, 32), mode="RGB"):
    """Picture i: one flat colour that encodes i, so a batch row tells which sample it came from."""
    return Image.new("RGB", size, (8 * i, 250 - 8 * i, 60)).convert(mode)


def jpeg(image, **kw):
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def ids_of(images):
    """The i of solid(i) for each normalised image of a batch."""
    red = images[:, 0].mean((1, 2)) * data.STD[0] + data.MEAN[0]
    return (red * 255 / 8).round().long().tolist()


def texts_of(tokens):
    return [bytes(v - 1 for v in row[1:row.argmax()].tolist()).decode() for row in tokens.reshape(-1, tokens.shape[-1])]


BAD = {"truncated": ("jpg", "corrupt_image"), "empty": ("jpg", "empty_file"), "html": ("jpg", "not_an_image"),
       "nocaption": ("jpg", "missing_caption"), "noimage": (None, "missing_image")}


def bad_members(key):
    """(name, bytes) of the bad sample `key`."""
    good = jpeg(solid(1))
    raw = {"truncated": good[:len(good) // 2], "empty": b"", "html": b"<html><body>404 Not Found</body></html>",
           "nocaption": good}.get(key)
    members = [(f"{key}.jpg", raw)] if raw is not None else []
    return members + ([] if key == "nocaption" else [(f"{key}.txt", b"a bad one")])


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, raw in members:
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def make_shards(root, n_shards=3, per_shard=8, stats=(0, 2), bad=()):
    """img2dataset webdataset layout: NNNNN.tar with key.jpg/.txt/.json, and NNNNN_stats.json for `stats`."""
    root.mkdir(exist_ok=True)
    i = 0
    for s in range(n_shards):
        members = []
        for _ in range(per_shard):
            key = f"{s:05d}{i:04d}"
            members += [(f"{key}.jpg", jpeg(solid(i))), (f"{key}.txt", f"sample {i}".encode()),
                        (f"{key}.json", b'{"url": "x"}')]
            i += 1
        if s == 0:
            for b in bad:
                members += bad_members(b)
        write_tar(root / f"{s:05d}.tar", members)
        if s in stats:
            n = per_shard + (len(bad) if s == 0 else 0)
            stats = {"count": n + 3, "successes": n, "failed_to_download": 3}
            (root / f"{s:05d}_stats.json").write_text(json.dumps(stats))
    return root


def build_real(source, **kw):
    args = dict(tokenizer="byte", image_size=32, context_length=24, batch_size=4, workers=0, seed=0)
    args.update(kw)
    return data.build_train_data(str(source), **args)


def test_decode_image_kinds_and_modes(tmp_path):
    for key, (_, kind) in BAD.items():
        if key in ("nocaption", "noimage"):
            continue
        with pytest.raises(data.BadSample) as e:
            data.decode_image(dict(bad_members(key))[f"{key}.jpg"])
        assert e.value.kind == kind
    with pytest.raises(data.BadSample, match="missing_file"):
        data.decode_image(str(tmp_path / "nope.jpg"))
    palette = solid(3).convert("P")
    palette.info["transparency"] = 0
    rgba = solid(3).convert("RGBA")
    for image in (solid(3, mode="L"), solid(3, mode="CMYK"), palette, rgba):
        buf = io.BytesIO()
        image.save(buf, "JPEG" if image.mode in ("L", "CMYK") else "PNG")
        out = data.decode_image(buf.getvalue())
        assert out.mode == "RGB" and out.size == (40, 32)
    # EXIF orientation 6: stored 40x32 with a red left half, shown rotated 90 degrees clockwise (32x40, red on top)
    stored = Image.new("RGB", (40, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = data.decode_image(jpeg(stored, exif=exif.tobytes()))
    assert out.size == (32, 40)
    top, bottom = np.asarray(out)[:10].mean((0, 1)), np.asarray(out)[-10:].mean((0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def write_csv(path, rows, delimiter):
    path.write_text("\n".join(delimiter.join(r) for r in rows) + "\n")


@pytest.mark.parametrize("delimiter", ["\t", ","])
def test_csv_sources(tmp_path, delimiter):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        solid(i).save(images / f"{i}.jpg")
    rows = [("filepath", "title")] + [(f"images/{i}.jpg", f"sample {i}") for i in range(12)]
    write_csv(tmp_path / "train.csv", rows, delimiter)  # paths relative to the CSV's folder
    write_csv(tmp_path / "rooted.csv", [("img", "cap")] + [(f"{i}.jpg", f"sample {i}") for i in range(12)], delimiter)
    for td in (build_real(tmp_path / "train.csv"),
               build_real(tmp_path / "rooted.csv", data_root=str(images), csv_img_key="img", csv_caption_key="cap")):
        assert td.num_samples == 12 and td.steps_per_epoch == 3
        seen = []
        for images_, tokens in td.batches(0):
            assert texts_of(tokens) == [f"sample {i}" for i in ids_of(images_)]  # image and caption stay paired
            seen += ids_of(images_)
        assert sorted(seen) == list(range(12))
    with pytest.raises(ValueError, match=r"no column 'filepath'.*\['img', 'cap'\]"):
        build_real(tmp_path / "rooted.csv")
    with pytest.raises(FileNotFoundError, match="--data-root"):
        build_real(tmp_path / "rooted.csv", csv_img_key="img", csv_caption_key="cap")


def test_several_captions_from_columns_or_separator(tmp_path):
    for i in range(8):
        solid(i).save(tmp_path / f"{i}.jpg")
    write_csv(tmp_path / "cols.csv", [("filepath", "title", "long")] +
              [(f"{i}.jpg", f"sample {i}", f"sample {i} long") for i in range(8)], "\t")
    write_csv(tmp_path / "sep.csv", [("filepath", "title")] +
              [(f"{i}.jpg", f"sample {i}|sample {i} long") for i in range(8)], "\t")
    for source, extra in (("cols.csv", dict(csv_caption_key="title,long")), ("sep.csv", dict(caption_sep="|"))):
        td = build_real(tmp_path / source, captions_per_image=2, **extra)
        for images, tokens in td.batches(0):
            assert tokens.shape == (4, 2, 24)
            for i, row in zip(ids_of(images), tokens):
                assert sorted(texts_of(row)) == [f"sample {i}", f"sample {i} long"]
        one = build_real(tmp_path / source, **extra)  # one caption of the two, drawn per step
        texts = {t for _ in range(3) for _, tokens in one.batches(_) for t in texts_of(tokens)}
        assert any(t.endswith("long") for t in texts) and any(not t.endswith("long") for t in texts)


def test_expand_shards_and_counts(tmp_path):
    root = make_shards(tmp_path / "shards", n_shards=3, stats=(0, 2))
    paths = [str(root / f"{s:05d}.tar") for s in range(3)]
    assert data.expand_shards(str(root / "{00000..00002}.tar")) == paths
    assert data.expand_shards(str(root / "{00000,00002}.tar")) == [paths[0], paths[2]]
    assert data.expand_shards(str(root / "*.tar")) == paths == data.expand_shards(str(root))
    (root / "00002_stats.json").write_text(json.dumps({"successes": 5}))  # the count is taken from stats
    assert data.Shards(paths).counts == [8, 8, 5]
    with pytest.raises(FileNotFoundError, match="00003.tar"):
        data.expand_shards(str(root / "{00000..00003}.tar"))


@pytest.mark.parametrize("workers,world_size", [(0, 1), (2, 1), (2, 2)])
def test_shards_read_every_sample_once(tmp_path, workers, world_size):
    root = make_shards(tmp_path / "s", n_shards=4, per_shard=6, stats=(1,))
    epochs = []
    for epoch in range(2):
        seen = []
        for rank in range(world_size):
            td = build_real(root / "{00000..00003}.tar", workers=workers, rank=rank, world_size=world_size,
                            batch_size=6 // world_size)
            assert td.num_samples == 24 and td.steps_per_epoch == 4
            batches = list(td.batches(epoch))
            assert len(batches) == 4 and dict(td.skipped) == {}
            for images, tokens in batches:
                assert texts_of(tokens) == [f"sample {i}" for i in ids_of(images)]
                seen += ids_of(images)
        assert sorted(seen) == list(range(24))  # no duplicate, no drop, across workers and ranks
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled per epoch


def test_shards_stream_is_deterministic_and_resumable(tmp_path):
    root = make_shards(tmp_path / "s", n_shards=3, per_shard=8)
    for workers in (0, 2):
        full = list(build_real(root, workers=workers).batches(3))
        again = list(build_real(root, workers=workers).batches(3))
        resumed = list(build_real(root, workers=workers).batches(3, start_step=3))
        assert len(resumed) == len(full) - 3 == 3
        for (a, ta), (b, tb), (c, tc) in zip(full, again, [(None, None)] * 3 + resumed):
            assert torch.equal(a, b) and torch.equal(ta, tb)
            assert c is None or (torch.equal(a, c) and torch.equal(ta, tc))


def test_shards_bad_samples_are_skipped_replaced_counted(tmp_path):
    root = make_shards(tmp_path / "s", n_shards=2, per_shard=6, stats=(0,), bad=list(BAD))
    good = jpeg(solid(1))
    write_tar(root / "00002.tar", [("a.jpg", good), ("a.txt", b"sample 1")] * 4)  # keys repeat: fine
    raw = (root / "00002.tar").read_bytes()
    (root / "00002.tar").write_bytes(raw[:len(raw) // 2])  # a shard cut short
    (root / "00002_stats.json").write_text(json.dumps({"successes": 4}))
    td = build_real(root, batch_size=3)
    assert td.num_samples == 6 + 5 + 6 + 4
    batches = list(td.batches(0))
    assert len(batches) == 7 and all(x.shape[0] == 3 and t.shape[0] == 3 for x, t in batches)
    for images, tokens in batches:
        assert texts_of(tokens) == [f"sample {i}" for i in ids_of(images)]
    for kind in ("corrupt_image", "empty_file", "not_an_image", "missing_caption", "missing_image"):
        assert td.skipped[kind] >= 1
    assert td.skipped["unreadable_shard"] >= 2


def test_files_folder(tmp_path):
    for i in range(10):
        d = tmp_path / f"{i // 5:05d}"
        d.mkdir(exist_ok=True)
        solid(i).save(d / f"{i:09d}.jpg")
        (d / f"{i:09d}.txt").write_text(f"sample {i}")
        (d / f"{i:09d}.json").write_text("{}")
    solid(2).save(tmp_path / "00001" / "orphan.jpg")  # no caption
    td = build_real(tmp_path, batch_size=5)
    assert td.num_samples == 11
    seen = []
    for images, tokens in td.batches(0):
        assert texts_of(tokens) == [f"sample {i}" for i in ids_of(images)]
        seen += ids_of(images)
    assert len(seen) == 10 and set(seen) <= set(range(10))


def test_check_command(tmp_path, capsys):
    root = make_shards(tmp_path / "s", n_shards=2, per_shard=5, stats=(0,), bad=list(BAD))
    counts = data.check(str(root))
    assert counts["good"] == 10 and all(counts[kind] == 1 for _, kind in BAD.values())
    raw = (root / "00000.tar").read_bytes()
    (root / "00000.tar").write_bytes(raw[:len(raw) // 2])  # its stats still promise 10 samples
    capsys.readouterr()
    assert data.main(["check", str(root / "{00000..00001}.tar"), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "15 samples expected" in out and "unreadable_shard: " in out
    with pytest.raises(SystemExit) as e:
        data.main(["check", str(tmp_path / "nope.csv")])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and "nope.csv" in err


def test_zeroshot_image_folder_and_templates(tmp_path):
    for c, name in enumerate(["red_car", "dog"]):
        (tmp_path / "zs" / name).mkdir(parents=True)
        for i in range(3):
            solid(4 * c + i).save(tmp_path / "zs" / name / f"{i}.png")
    (tmp_path / "zs" / "dog" / "broken.jpg").write_bytes(b"")
    (tmp_path / "t.txt").write_text("a photo of a {}.\n\n# comment\nart of the {}.\n")
    ev = evaluate.build_eval_sets("x.csv", tokenizer="byte", image_size=32, context_length=32, batch_size=4,
                              zeroshot_data=str(tmp_path / "zs"), templates=str(tmp_path / "t.txt"))
    zs = ev["zeroshot"]
    assert "retrieval" not in ev and zs["classnames"] == ["dog", "red car"]  # sorted folders
    assert zs["templates"] == ["a photo of a {}.", "art of the {}."]
    assert texts_of(zs["tokens"]) == ["a photo of a dog.", "art of the dog.", "a photo of a red car.",
                                      "art of the red car."]
    pairs = [(i, y) for images, labels in zs["batches"] for i, y in zip(ids_of(images), labels.tolist())]
    assert sorted(pairs) == [(0, 1), (1, 1), (2, 1), (4, 0), (5, 0), (6, 0)]
    assert zs["batches"].skipped == {"empty_file": 1}
    default = evaluate.build_eval_sets("x.csv", tokenizer="byte", image_size=32, context_length=32,
                                   zeroshot_data=str(tmp_path / "zs"))
    assert default["zeroshot"]["templates"] == list(evaluate.SIMPLE_TEMPLATES)
    with pytest.raises(ValueError, match="no '{}'"):
        evaluate.load_templates(["a photo"], synthetic.TEMPLATES)
    with pytest.raises(ValueError, match="no class folders"):
        data.image_folder(str(tmp_path / "zs" / "dog"))


def test_imagenet_layout_check(tmp_path):
    for k in range(1000):
        (tmp_path / f"n{k:08d}").mkdir()
    solid(0).save(tmp_path / "n00000000" / "a.jpg")
    folder, names = data.image_folder(str(tmp_path))
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet tissue" and len(folder) == 1
    (tmp_path / "n00000999").rmdir()
    with pytest.raises(ValueError, match="999 ImageNet wnid folders"):
        data.image_folder(str(tmp_path))


def test_retrieval_on_caption_sources(tmp_path):
    root = make_shards(tmp_path / "s", n_shards=2, per_shard=5, bad=["html"])
    for i in range(4):
        solid(i).save(tmp_path / f"{i}.jpg")
    write_csv(tmp_path / "val.csv", [("filepath", "title")] + [(f"{i}.jpg", f"sample {i}") for i in range(4)], ",")
    for val, n, workers in ((str(root), 10, 2), (str(tmp_path / "val.csv"), 4, 0)):
        ev = evaluate.build_eval_sets("x", tokenizer="byte", image_size=32, context_length=24, val_data=val,
                                  captions_per_image=2, batch_size=3, workers=workers)
        rt = ev["retrieval"]["batches"]
        seen = []
        for images, tokens in rt:
            assert tokens.shape[1:] == (2, 24)
            for i, row in zip(ids_of(images), tokens):
                assert texts_of(row) == [f"sample {i}"] * 2  # one caption, cycled to k = 2
                seen.append(i)
        assert len(seen) == n and "zeroshot" not in ev
