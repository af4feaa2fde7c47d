r"""
Tokenizers for the CLIP text tower: a byte-level one (the default for the synthetic set, no files) and
OpenAI CLIP's BPE (49,408 ids, for real captions and open_clip interop), written with the standard
library only.

Both share open_clip's conventions: every sequence is [SOT, ids..., EOT, 0, 0, ...] of a fixed context
length; a caption that is too long is truncated and its last slot forced to EOT; EOT has the largest id of
the vocabulary, so the text tower can pool at tokens.argmax(-1).

Byte tokenizer: pad 0, byte b -> b + 1, SOT 257, EOT 258, vocabulary 259. Text is stripped and runs of
whitespace collapsed to one space; it is not lower-cased (every byte is kept).

CLIP BPE (Radford et al. 2021; open_clip's SimpleTokenizer): merges from bpe_simple_vocab_16e6.txt.gz, SOT
49406, EOT 49407. Deviations, to need no package beyond the standard library: ftfy.fix_text is replaced by
html.unescape twice + NFC normalisation, and the `regex` package's \p{L} / \p{N} classes by `re` classes
built from unicodedata. The ids are identical to open_clip's on ASCII (tested against open_clip when it
is importable); they can differ on mojibake, curly quotes and full-width characters that ftfy repairs. A hostile
caption costs no more than a normal one: encoding stops once the context is full, and a word is cut at MAX_WORD
characters (open_clip would merge an 80,000-letter word for a minute, in time quadratic in its length).
"""

import gzip
import html
import importlib.util
import os
import re
import sys
import unicodedata

import torch

# -----------------------------------------------------------------------------
# byte-level


class ByteTokenizer:
    """UTF-8 bytes as tokens: pad 0, byte b -> b + 1, SOT 257, EOT 258 (largest id), vocab 259."""

    name = "byte"
    vocab_size = 259
    sot, eot = 257, 258

    def encode(self, text):
        return [b + 1 for b in " ".join(text.split()).encode("utf-8")]

    def __call__(self, texts, context_length):
        return _pack([self.encode(t) for t in _as_list(texts)], self.sot, self.eot, context_length)


def _as_list(texts):
    return [texts] if isinstance(texts, str) else list(texts)


def _pack(id_lists, sot, eot, context_length):
    """[SOT, ids, EOT] padded with 0 to context_length; truncated ones end with EOT."""
    if context_length < 2:
        raise ValueError(f"context_length={context_length} is too short: it needs room for SOT and EOT (>= 2)")
    out = torch.zeros(len(id_lists), context_length, dtype=torch.long)
    for i, ids in enumerate(id_lists):
        seq = [sot] + ids + [eot]
        if len(seq) > context_length:
            seq = seq[:context_length]
            seq[-1] = eot
        out[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


_BYTE = ByteTokenizer()


def tokenize(texts, context_length):
    """Byte-level tokens of a string or a list of strings: LongTensor [N, context_length]."""
    return _BYTE(texts, context_length)


# -----------------------------------------------------------------------------
# CLIP BPE

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
MAX_WORD = 200  # characters of a word that reach the merges: BERT's WordPiece bound (max_input_chars_per_word), as in
# Chinese-CLIP's tokenizer (OFA-Sys/Chinese-CLIP, cn_clip/clip/bert_tokenizer.py); open_clip and HF's CLIP have none
CACHE_WORDS = 10_000  # words whose merges are kept: HF tokenizers' BPE cache capacity (DEFAULT_CACHE_CAPACITY)


def bytes_to_unicode():
    """GPT-2's reversible map of the 256 bytes to printable characters (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def _pattern():
    """CLIP's pre-tokenizer with `re`: letters, single numbers, runs of other symbols. \\p{N} includes
    numeric characters that are not decimal digits (², ½, Ⅻ); `re` counts those as word characters."""
    numeric = "".join(re.escape(chr(c)) for c in range(sys.maxunicode + 1)
                      if chr(c).isnumeric() and not chr(c).isdecimal())
    letters, number, other = rf"[^\W\d_{numeric}]+", rf"[\d{numeric}]", r"(?:[^\s\w]|_)+"
    return re.compile(rf"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|{letters}|{number}|{other}")


class BPETokenizer:
    """OpenAI CLIP's byte-pair encoding: vocab 49,408 = 256 bytes + 256 word-final bytes + 48,894 merges + 2."""

    name = "clip-bpe"
    vocab_size = 49408

    def __init__(self, bpe_path):
        try:
            lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1:self.vocab_size - 512 - 2 + 1]
        except (OSError, EOFError, UnicodeDecodeError) as e:  # not gzip, cut short, not text
            raise ValueError(f"--bpe {bpe_path}: not a CLIP BPE vocabulary ({e}); pass {BPE_FILE}") from None
        merges = [tuple(line.split()) for line in lines if line]
        self.byte_encoder = bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<start_of_text>", "<end_of_text>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = self.encoder["<start_of_text>"], self.encoder["<end_of_text>"]
        self.vocab_size = len(self.encoder)  # 49,408 with the full file
        self.pattern = _pattern()
        self.cache = {}  # token -> its merged pieces

    def bpe(self, token):
        """Merge the pair of lowest rank until none is left: 'hello' -> ('hello</w>',)."""
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]  # at most MAX_WORD characters (UTF-8 bytes: 4x): bounded work
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        if len(self.cache) < CACHE_WORDS:  # bounded: a web-scale stream of unique words would grow it forever
            self.cache[token] = tuple(word)
        return tuple(word)

    def clean(self, text):
        text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)))
        return " ".join(text.split()).lower()

    def encode(self, text, limit=None):
        """The ids of `text`; with a limit, the first `limit` ids or more (no work past them)."""
        ids = []
        for match in self.pattern.finditer(self.clean(text)):
            if limit is not None and len(ids) >= limit:
                break
            token = "".join(self.byte_encoder[b] for b in match.group()[:MAX_WORD].encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token)]
        return ids

    def decode(self, ids):
        text = "".join(self.decoder[i] for i in ids if i not in (self.sot, self.eot))
        text = bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()

    def __call__(self, texts, context_length):  # _pack keeps the first context_length - 2 ids
        return _pack([self.encode(t, context_length - 2) for t in _as_list(texts)], self.sot, self.eot, context_length)


def find_bpe():
    """bpe_simple_vocab_16e6.txt.gz inside an installed open_clip or clip package (not imported), or None."""
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            path = os.path.join(os.path.dirname(spec.origin), BPE_FILE)
            if os.path.isfile(path):
                return path
    return None


# -----------------------------------------------------------------------------

VOCAB_SIZES = {"byte": ByteTokenizer.vocab_size, "clip-bpe": BPETokenizer.vocab_size}  # a model's vocabulary, by name


def get_tokenizer(name, bpe_path=None):
    """The tokenizer called `name` ("byte" or "clip-bpe"); bpe_path locates bpe_simple_vocab_16e6.txt.gz,
    else it is looked for in an installed open_clip or clip package."""
    if name == "byte":
        return _BYTE
    if name != "clip-bpe":
        raise ValueError(f"unknown tokenizer {name!r}: use 'byte' or 'clip-bpe'")
    if bpe_path and not os.path.isfile(bpe_path):
        raise FileNotFoundError(f"--bpe {bpe_path}: no such file; pass the path of {BPE_FILE}")
    bpe_path = bpe_path or find_bpe()
    if bpe_path is None:
        raise FileNotFoundError(f"the clip-bpe tokenizer needs {BPE_FILE}: pass --bpe PATH (the file ships in the "
                                f"pip packages open_clip_torch and clip-anytorch), or use the byte tokenizer")
    return BPETokenizer(bpe_path)


def prompt_tokens(tokenizer, classnames, templates, context_length):
    """Zero-shot prompts: every template ("a photo of a {}.") filled with every class name, tokenized: long
    [classes, templates, context_length]."""
    prompts = tokenizer([t.format(c) for c in classnames for t in templates], context_length)
    return prompts.view(len(classnames), len(templates), context_length)
