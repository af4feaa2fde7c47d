"""Tokenizers: the byte-level one pinned by hand."""

import pytest
import torch

from tokenizer import get_tokenizer, tokenize


def test_byte_tokens_by_hand():
    t = tokenize(["ab", "é"], 6)
    assert t.dtype == torch.long and t.shape == (2, 6)
    assert t[0].tolist() == [257, 98, 99, 258, 0, 0]
    assert t[1].tolist() == [257, 0xC3 + 1, 0xA9 + 1, 258, 0, 0]  # UTF-8 bytes of é, shifted by one


def test_byte_round_trip_and_eot_is_argmax():
    texts = ["a red circle left of a blue square", "  two   spaces\tand a tab "]
    t = tokenize(texts, 64)
    for row, text in zip(t, texts):
        eot = row.argmax().item()
        assert row[eot] == 258 and row[0] == 257 and (row[eot + 1:] == 0).all()
        assert bytes(v - 1 for v in row[1:eot].tolist()).decode() == " ".join(text.split())


def test_byte_truncation_keeps_eot_last():
    t = tokenize("x" * 100, 16)[0]
    assert t[0] == 257 and t[-1] == 258 and (t[1:-1] == ord("x") + 1).all()
    assert tokenize("abc", 5)[0].tolist() == [257, 98, 99, 100, 258]  # exactly fits: nothing lost
    with pytest.raises(ValueError, match="context_length"):
        tokenize("a", 1)


def test_get_tokenizer():
    tok = get_tokenizer("byte")
    assert tok.name == "byte" and tok.vocab_size == 259
    assert torch.equal(tok(["hi"], 8), tokenize(["hi"], 8))
    assert tokenize("hi", 8).max() < tok.vocab_size
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("gpt2")


# -----------------------------------------------------------------------------
# CLIP BPE

import gzip  # noqa: E402

import tokenizer  # noqa: E402


@pytest.fixture
def tiny_bpe(tmp_path):
    """A merges file with four merges: h+e, l+l, he+ll, hell+o</w>."""
    path = tmp_path / "bpe.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\nh e\nl l\nhe ll\nhell o</w>\n")
    return tokenizer.BPETokenizer(str(path))


def test_bpe_by_hand(tiny_bpe):
    tok = tiny_bpe
    assert tok.vocab_size == 256 + 256 + 4 + 2 and (tok.sot, tok.eot) == (516, 517)
    letter = lambda c: ord(c) - ord("!")  # noqa: E731  (printable bytes come first, from "!")
    assert tok.encode("Hello") == [515]  # lower-cased, then all four merges
    assert tok.encode("hell") == [512, letter("l"), 256 + letter("l")]  # he, l, l</w>: "ll" is not at the end
    assert tok(["hello hello"], 6)[0].tolist() == [516, 515, 515, 517, 0, 0]
    assert tok(["hello " * 10], 4)[0].tolist() == [516, 515, 515, 517]  # truncated, EOT kept last
    assert tok.decode(tok.encode("hello hell")) == "hello hell"


def test_bpe_pretokenizer(tiny_bpe):
    split = tiny_bpe.pattern.findall
    assert split("it's 3.5 x_y ½!! café") == ["it", "'s", "3", ".", "5", "x", "_", "y", "½", "!!", "café"]
    assert split("a<end_of_text>b") == ["a", "<end_of_text>", "b"]
    assert tiny_bpe.clean("  A &amp;amp;\tB ") == "a & b"


def test_bpe_file_is_required(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--bpe"):
        get_tokenizer("clip-bpe", str(tmp_path / "missing.txt.gz"))
    monkeypatch.setattr(tokenizer, "find_bpe", lambda: None)
    with pytest.raises(FileNotFoundError, match="--bpe PATH"):
        get_tokenizer("clip-bpe")


def test_bpe_matches_open_clip():
    open_clip = pytest.importorskip("open_clip")
    tok, ref = get_tokenizer("clip-bpe"), open_clip.get_tokenizer("ViT-B-16")
    assert tok.vocab_size == 49408 and (tok.sot, tok.eot) == (49406, 49407)
    texts = ["a photo of a cat.", "Actor attends the premiere of the film at the festival", "It's 2024, isn't it?!",
             "  tabs\tand\nnewlines  ", "&amp; &lt;b&gt; x_y__z a_!b 3.14", "café naïve ½ ² Ⅷ 日本語",
             "word " * 100]
    assert torch.equal(tok(texts, 77), ref(texts, 77))
    assert tok.decode(tok.encode("a photo of a cat")) == "a photo of a cat"
