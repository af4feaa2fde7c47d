"""interop.py: importing open_clip / official CoM-PT / our checkpoints, config inference, open_clip local-dir export.
The open_clip round trips are skipped where open_clip is not installed (it is not a dependency)."""
import argparse
import json
import os

import pytest
import torch
import torch.nn as nn

import interop
import tokenizer
import vit


def tiny_cfg(**kw):
    # a registered size with small data-dependent fields; the CLIP BPE vocabulary, so the config is inferable
    return vit.config("cpu-tiny", **{"image_size": 32, "patch_size": 8, "context_length": 16, **kw})


def batch(cfg, B=2):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.randint(1, cfg.vocab_size - 1, (B, cfg.context_length), generator=g)
    tokens[0, 4], tokens[0, 5:] = cfg.vocab_size - 1, 0  # EOT (the largest id), then padding
    tokens[1, -1] = cfg.vocab_size - 1
    return images, tokens


def embeddings(model, cfg):
    images, tokens = batch(cfg)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def trained_like(cfg, seed=0):
    # a model whose LayerNorms and biases are off their init, so that a dropped or misplaced tensor shows
    torch.manual_seed(seed)
    model = vit.CLIP(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


class Wrapper(nn.Module):  # stands in for DDP (`module.`) and torch.compile (`_orig_mod.`)
    def __init__(self, model, name):
        super().__init__()
        self.add_module(name, model)


def assert_same_embeddings(a, b, cfg):
    for x, y in zip(embeddings(a, cfg), embeddings(b, cfg)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# import


@pytest.mark.parametrize("size", list(vit.SIZES))
@pytest.mark.parametrize("data", [{}, {"image_size": 64, "context_length": 32, "vocab_size": 259}])
def test_config_is_inferred_from_shapes_for_every_size(size, data):
    cfg = vit.config(size, **data)
    with torch.device("meta"):  # shapes only
        state = vit.CLIP(cfg).state_dict()
    inferred = interop.infer_config(state)
    expected_tokenizer = "byte" if data else "clip-bpe"
    assert inferred == vit.config(size, **data, tokenizer=expected_tokenizer)
    assert interop.size_of(inferred) == size


def test_tokenizer_vocabulary_sizes_agree_with_tokenizer_py():
    assert interop.TOKENIZER_BY_VOCAB[tokenizer.get_tokenizer("byte").vocab_size] == "byte"
    assert vit.CLIPConfig().vocab_size == 49408 and interop.TOKENIZER_BY_VOCAB[49408] == "clip-bpe"


def test_unknown_shapes_raise_clear_errors():
    with torch.device("meta"):
        odd_depth = vit.CLIP(vit.config("tiny", vision_layers=5)).state_dict()
        odd_vocab = vit.CLIP(vit.config("tiny", vocab_size=1000)).state_dict()
    with pytest.raises(ValueError, match=r"image tower 192 wide x 5 layers.*no registered size.*tiny \(192/12"):
        interop.infer_config(odd_depth)
    with pytest.raises(ValueError, match="vocabulary of 1000 tokens matches no tokenizer"):
        interop.infer_config(odd_vocab)
    with pytest.raises(ValueError, match="no 'visual.conv1.weight'.*not a CLIP state dict"):
        interop.infer_config({"fc.weight": torch.zeros(2, 2)})


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_bare_state_dict_with_wrapper_prefixes(tmp_path, prefix):
    cfg = tiny_cfg()
    model = trained_like(cfg)
    path = tmp_path / "zoo.pt"
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
    state, inferred = interop.load_state_dict_any(path)
    assert inferred == cfg and set(state) == set(model.state_dict())
    assert_same_embeddings(interop.load_model(path), model, cfg)


def test_open_clip_style_training_dict(tmp_path):
    # open_clip / official CoM-PT layout: epoch, name, state_dict (DDP keys), optimizer, scaler
    cfg = tiny_cfg()
    model = trained_like(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    model(*batch(cfg))[0].sum().backward()
    optimizer.step()
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scaler": {"scale": 65536.0}}, path)
    state, inferred = interop.load_state_dict_any(path)
    assert inferred == cfg
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)


def test_our_checkpoint_uses_its_stored_config(tmp_path):
    # a config the shapes alone could not give (byte tokenizer with an odd vocabulary, one image layer)
    cfg = tiny_cfg(vision_layers=1, vocab_size=300, tokenizer="byte")
    model = trained_like(cfg)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": 7}, path)
    state, loaded = interop.load_state_dict_any(path)
    assert loaded == cfg
    assert_same_embeddings(interop.load_model(path), model, cfg)
    torch.save({"model": model.state_dict(), "config": tiny_cfg(vocab_size=300, tokenizer="byte").to_dict()}, path)
    with pytest.raises(ValueError, match=r"does not match its config \(missing \['visual.transformer.resblocks.1"):
        interop.load_state_dict_any(path)


def test_a_run_or_chain_stage_folder_loads_its_checkpoint(tmp_path):
    cfg = tiny_cfg(vocab_size=300, tokenizer="byte")
    model = trained_like(cfg)
    stage = tmp_path / "chain" / "1-cpu-tiny"
    stage.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": 7}, stage / "checkpoint.pt")
    interop.export_open_clip(trained_like(cfg, seed=1), cfg, str(stage / "open_clip"))  # another model beside it
    state, loaded = interop.load_state_dict_any(stage)
    assert loaded == cfg
    assert_same_embeddings(interop.load_model(stage), model, cfg)  # the folder's checkpoint.pt
    (tmp_path / "chain" / "2-cpu-small").mkdir()  # a stage not started yet
    with pytest.raises(FileNotFoundError, match=r"chain is a folder of no model.*give one of its model folders "
                                                 r"\(1-cpu-tiny\)$"):
        interop.load_state_dict_any(tmp_path / "chain")


def test_unreadable_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        interop.load_state_dict_any(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="needs open_clip_config.json"):
        interop.load_state_dict_any(tmp_path)
    pickled = tmp_path / "args.pt"
    torch.save({"args": argparse.Namespace(lr=1e-3), "state_dict": {}}, pickled)
    with pytest.raises(ValueError, match=r"refused as unsafe to load: it holds a argparse.Namespace object"):
        interop.load_state_dict_any(pickled)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        interop.load_state_dict_any(text)
    no_weights = tmp_path / "opt.pt"
    torch.save({"epoch": 1, "optimizer": {"state": {}}}, no_weights)
    with pytest.raises(ValueError, match="without 'state_dict' or 'model'"):
        interop.load_state_dict_any(no_weights)


# -----------------------------------------------------------------------------
# export


def test_export_writes_an_open_clip_local_dir_that_loads_back_here(tmp_path):
    cfg = tiny_cfg(vision_layers=1, vocab_size=300, tokenizer="byte")
    model = trained_like(cfg)
    out = interop.export_open_clip(Wrapper(model, "module"), cfg, str(tmp_path / "open_clip"))
    assert sorted(os.listdir(out)) == ["open_clip_config.json", "open_clip_pytorch_model.bin"]
    config = json.loads((tmp_path / "open_clip" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["heads"] == cfg.text_heads  # open_clip's default (8) would be wrong
    assert config["preprocess_cfg"]["size"] == cfg.image_size and config["clip_config"]["tokenizer"] == "byte"
    state = torch.load(os.path.join(out, "open_clip_pytorch_model.bin"), weights_only=True)
    assert set(state) == set(model.state_dict())  # no wrapper prefix
    state, loaded = interop.load_state_dict_any(out)
    assert loaded == cfg
    assert_same_embeddings(interop.load_model(out), model, cfg)


def test_export_refuses_a_model_that_does_not_match_the_config(tmp_path):
    with pytest.raises(ValueError, match="does not match its config"):
        interop.export_open_clip(vit.CLIP(tiny_cfg()), tiny_cfg(text_layers=3), str(tmp_path))


def test_export_round_trips_through_open_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    cfg = tiny_cfg()
    model = trained_like(cfg)
    out = interop.export_open_clip(model, cfg, str(tmp_path / "open_clip"))
    theirs, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + out)
    assert_same_embeddings(theirs.eval(), model, cfg)
    assert preprocess.transforms[1].size == (cfg.image_size, cfg.image_size)  # Resize, CenterCrop(image_size), ...
    assert open_clip.get_tokenizer("local-dir:" + out).context_length == cfg.context_length


def test_open_clip_checkpoint_with_module_prefix_imports(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    cfg = tiny_cfg()
    torch.manual_seed(0)
    theirs = open_clip.CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=dict(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
                        layers=cfg.vision_layers),
        text_cfg=dict(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                      heads=cfg.text_heads, layers=cfg.text_layers),
    ).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in theirs.state_dict().items()}}, path)
    assert_same_embeddings(interop.load_model(path), theirs, cfg)
