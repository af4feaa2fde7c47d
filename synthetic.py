"""
The embedded synthetic image-caption set, drawn in batches on any device with tensor ops (no image library).
Not part of the paper, which trains on CC3M (Sec. 4): a stand-in on which a chain of CLIP models trains on a CPU.

Pictures of coloured shapes with captions, for training CLIP models without files. Every attribute of picture
`index` of a split comes from a counter-based hash of (seed, split, index), computed with integer tensor ops, so a
picture is the same whatever batch it is drawn in, on whatever device, rank or worker. Shapes are rasterised from
signed distance functions with anti-aliasing, a whole batch at once and only in a window around each object
(bit for bit the full-picture formula: tests/test_synthetic.py), and the training augmentation (open_clip's
RandomResizedCrop, scale 0.9-1) is folded into the sampling coordinates: the crop is drawn directly, not resampled.
Captions are assembled from pre-tokenised words with tensor ops.

Designed for graded learning. 8 colours x 8 shapes x 2 sizes x 9 places (and a second object in a quarter of the
pictures), so no single attribute tells a batch apart; paraphrases that leave the colour out ("a star", "big hexagon
top left") make shape pay from the first steps; half the shapes are turned by any angle, which is what keeps shape
hard for small models (all upright, cpu-tiny reaches 84% zero-shot in 1,000 steps; half turned, 41%). The zero-shot
task is the 64 colour-shape classes on one big object; held-out splits give retrieval and per-attribute probe labels.
"""

import math
from collections import Counter

import torch

import runtime
from tokenizer import prompt_tokens
from vit import MEAN, STD  # CLIP's input normalisation

# -----------------------------------------------------------------------------
# the data shape of the set: the one definition

IMAGE_SIZE = 32        # pixels
PATCH_SIZE = 8         # ViT patch: a 4 x 4 grid of patches
CONTEXT_LENGTH = 32    # tokens, SOT and EOT included: every caption fits (tests/test_synthetic.py)
TOKENIZER = "byte"
NUM_SAMPLES = 100_000  # training pictures per epoch
DATA_SHAPE = dict(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, context_length=CONTEXT_LENGTH, tokenizer=TOKENIZER)


# -----------------------------------------------------------------------------
# what a picture holds

COLOURS = {"red": (0.86, 0.16, 0.16), "green": (0.16, 0.67, 0.24), "blue": (0.16, 0.31, 0.86),
           "yellow": (0.90, 0.82, 0.16), "purple": (0.55, 0.20, 0.71), "cyan": (0.16, 0.78, 0.82),
           "pink": (0.96, 0.55, 0.75), "white": (0.96, 0.96, 0.96)}
def star_edge(n, k):
    """The boundary of a star of n points whose inner vertices lie at k times its outer radius (k = cos(pi / n): the
    regular n-gon) in the wedge around its first tip: the half-plane a x + b y < c through the tip (1, 0) and the
    inner vertex k (cos(pi / n), sin(pi / n)); (a, b) is its outward normal."""
    ex, ey = k * math.cos(math.pi / n) - 1, k * math.sin(math.pi / n)
    a, b = ey / math.hypot(ex, ey), -ex / math.hypot(ex, ey)
    return a, b, a


# shape -> (n, turn, scale, plane, plane): n-fold symmetric, the intersection of two half-planes in the wedge around
# its first tip (lengths in circumradii); turn: where its first tip points upright; scale: circumradius / object radius
# UP: a tip pointing up (y grows downwards); ROUND: a 64-gon; NO_PLANE: 0 < 1000 radii, a half-plane holding everything
UP, ROUND, NO_PLANE = -math.pi / 2, star_edge(64, math.cos(math.pi / 64)), (0.0, 0.0, 1e3)
SHAPES = {"circle": (64, 0.0, 0.85, ROUND, NO_PLANE),
          "ring": (64, 0.0, 0.95, ROUND, (-1.0, 0.0, -0.5)),  # outside a hole of half its radius
          "triangle": (3, UP, 1.0, star_edge(3, 0.5), NO_PLANE),
          "square": (4, math.pi / 4, 0.95, star_edge(4, math.cos(math.pi / 4)), NO_PLANE),
          "pentagon": (5, UP, 0.92, star_edge(5, math.cos(math.pi / 5)), NO_PLANE),
          "hexagon": (6, 0.0, 0.9, star_edge(6, math.cos(math.pi / 6)), NO_PLANE),
          "star": (5, UP, 1.05, star_edge(5, 0.45), NO_PLANE),
          "cross": (4, 0.0, 1.0, (1.0, 0.0, 1.0), (0.0, 1.0, 0.32))}  # the arm's end and its side
SHAPES_IN_ORDER = tuple(SHAPES)
SIZES = ("small", "big")
RADII = ((0.16, 0.18), (0.22, 0.245))  # object radius range per size, in image widths (32 px: 5.1-5.8, 7.0-7.8)
LATTICE = (0.25, 0.5, 0.75)            # where objects sit: corners of the 4 x 4 patch grid
JITTER = 0.0                           # a turned object's shift off its lattice point, either way, in image widths
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")
ZEROSHOT_SIZE = 1      # zero-shot pictures hold one big object
TWO_OBJECTS = 0.25     # probability of a two-object training picture
TILTED = 0.5           # fraction of shapes turned by any angle (the others upright)
COLOUR_JITTER = 0.08   # per channel, either way
NOISE = 0.03           # std of the per-pixel noise
NOISE_TILES = 256      # the noise of a picture: one of a fixed bank of tiles

ONE = ("{size} {colour} {shape}", "{colour} {shape} {where}", "{size} {shape} {where}", "a {colour} {shape}",
       "a {shape}", "{size} {shape}", "{shape} {where}")  # one object: the first three together name all it shows
TWO = ("{shape} {relation} {shape2}", "{colour} {relation} {colour2}", "{colour} {shape} and {shape2}")
FULL_CAPTIONS = 3      # retrieval: the first 3 paraphrases of each picture
ZEROSHOT_PER_CLASS = 20  # held-out zero-shot pictures per class
RETRIEVAL_SIZE = 500   # held-out retrieval pictures
PROBES = 4000          # held-out pictures that fit the attribute probes; half as many score them
CLASSNAMES = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # the zero-shot classes
TEMPLATES = ("a {}", "big {}", "small {}")  # zero-shot prompts, averaged per class as CLIP does

# what a linear probe can be asked about a picture (probe labels: value index, -1 where it does not apply)
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": tuple(SHAPES), "size": SIZES, "position": POSITIONS,
              "count": ("one", "two"), "relation": RELATIONS}

SPLITS = ("train", "retrieval", "zeroshot", "probe-train", "probe-test")

# -----------------------------------------------------------------------------
# a counter-based hash: 32-bit words in int64 tensors, exact on every device

MASK32 = 0xFFFFFFFF
# The hash streams: the word after the seed tells them apart. draws() puts a split's index there (0-4); the training
# streams take numbers that no split has.
CROP_STREAM = 7            # view(): the training crop of (epoch, index)
CAPTION_STREAM = 11        # TrainData.batch(): which paraphrases of (epoch, index)
ORDER_STREAM = 1_000_003   # TrainData.order(): the epoch's permutation


def mix32(h):
    """A bijection of 32-bit words that spreads every input bit over the output (xorshift-multiply, Wellons'
    lowbias32 shape with multipliers below 2^31, so that products of 32-bit words never overflow int64)."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & MASK32  # lowbias32's multipliers (Wellons' hash-prospector search)
    h = h ^ (h >> 15)
    h = (h * 0x6A5D39E9) & MASK32
    return h ^ (h >> 16)


def hash32(*words):
    """A 32-bit hash of a sequence of integers and int64 tensors (broadcast together); put plain integers first:
    they are mixed in Python, the tensors by tensor ops."""
    h = 0x9E3779B9  # 2^32 / golden ratio: a start with its bits spread, so that leading zero words still mix
    for w in words:
        h = mix32(h ^ (w & MASK32))  # a bijection of the word for a given prefix, and of the prefix for a given word
    return h


def uniform(h):
    """Floats in [0, 1) from the top 24 bits of 32-bit hashes: exact in float32."""
    return (h >> 8).float() * (1.0 / (1 << 24))


# -----------------------------------------------------------------------------
# attributes of pictures


def draws(seed, split, index, n, salt=0):
    """n uniform floats per picture, [B, n]: a function of (seed, split, index, salt) only."""
    index = torch.as_tensor(index, dtype=torch.long)
    return uniform(hash32(seed, SPLITS.index(split), salt, index[:, None], torch.arange(n, device=index.device)))


def pick(u, n):
    """A uniform u in [0, 1) -> an integer in [0, n)."""
    return (u * n).long().clamp(max=n - 1)


def scene(seed, split, index):
    """The attributes of pictures `index` (long [B]) of `split`, as a dict of tensors on index's device.
    Per object slot k (2 slots): colour, shape, size, position (lattice point), cx, cy, radius, angle [B, 2]; and
    count [B] (1 or 2), relation [B] (of object 0 to object 1; -1 for one object)."""
    index = torch.as_tensor(index, dtype=torch.long)
    u = draws(seed, split, index, 32)  # (B, 32)
    # the 32 draws of a picture, by column (pairs: object slots 0 and 1): 0-1 colour, 2-3 shape, 4 whether it holds two
    # objects, 5-6 size, 7-8 radius within its size's range, 9 lattice point (one object), 10 relation and 11 the row
    # or column (two objects), 12-15 shift x and y, 16-17 angle, 18-20 background (grey, slope, noise tile), 21-26
    # colour jitter (3 channels each), 27-28 whether turned; 29-31 unused
    device = index.device
    nc, ns = len(COLOURS), len(SHAPES)
    colour = pick(u[:, 0:2], nc)
    shape = pick(u[:, 2:4], ns)
    size = pick(u[:, 5:7], 2)
    if split == "zeroshot":  # the classes in turn: a balanced set of one-object pictures
        colour[:, 0], shape[:, 0] = (index % (nc * ns)) // ns, index % ns
        if ZEROSHOT_SIZE is not None:
            size[:, 0] = ZEROSHOT_SIZE
    # the second object differs from the first in colour or shape
    same = (colour[:, 1] == colour[:, 0]) & (shape[:, 1] == shape[:, 0])
    shape[:, 1] = torch.where(same, (shape[:, 1] + 1) % ns, shape[:, 1])
    two = (u[:, 4] < TWO_OBJECTS) & (split != "zeroshot")
    count = 1 + two.long()
    lo, hi = (torch.tensor(r, device=device)[size] for r in zip(*RADII))
    radius = lo + (hi - lo) * u[:, 7:9]  # (B, 2)
    # one object: at one of the 3 x 3 lattice points; two: at the two ends of a row (left of / right of) or of a
    # column (above / below) of the lattice
    point = pick(u[:, 9], 9)
    relation = torch.where(two, pick(u[:, 10], 4), -1)
    line = pick(u[:, 11], 3)
    end = torch.where((relation == 0) | (relation == 2), 0, 2)  # object 0 at the low end for left of / above
    horizontal = relation < 2
    col = torch.stack([torch.where(horizontal, end, line), torch.where(horizontal, 2 - end, line)], 1)
    row = torch.stack([torch.where(horizontal, line, end), torch.where(horizontal, line, 2 - end)], 1)
    col = torch.where(two[:, None], col, (point % 3)[:, None])
    row = torch.where(two[:, None], row, (point // 3)[:, None])
    position = row * 3 + col
    lattice = torch.tensor(LATTICE, device=device)
    tossed = u[:, 27:29] < TILTED  # (B, 2) turned by any angle (and shifted by up to JITTER); the others upright
    cx = lattice[col] + JITTER * (2 * u[:, 12:14] - 1) * tossed
    cy = lattice[row] + JITTER * (2 * u[:, 14:16] - 1) * tossed
    angle = (2 * u[:, 16:18] - 1) * math.pi * tossed
    return dict(count=count, colour=colour, shape=shape, size=size, position=position, cx=cx, cy=cy,
                radius=radius, angle=angle, relation=relation, background=u[:, 18:21], tint=u[:, 21:27])


# -----------------------------------------------------------------------------
# rendering


def _reach(n, plane1, plane2):
    """(k, d): no point farther than k R + d e from a shape's centre lies within e of it by its sdf (R: circumradius;
    coverage is 0 beyond e = half a pixel). In the folded wedge (angle psi in [0, pi / n] from the tip) the first
    plane gives rho (a cos psi + b sin psi) < c R + e, and a cos psi + b sin psi >= m, its least value, at an end."""
    (a, b, c), (a2, b2, c2) = plane1, plane2
    m = min(a, a * math.cos(math.pi / n) + b * math.sin(math.pi / n))
    if (a, b, a2, b2) == (1.0, 0.0, 0.0, 1.0):  # the cross's arm, a rectangle: x < c R + e, 0 <= y < c2 R + e
        return math.hypot(c, c2), math.sqrt(2)  # hypot(cR + e, c2R + e) <= hypot(c, c2) R + hypot(1, 1) e
    return c / m, 1 / m


def _shape_table(device):
    """SHAPES as rows (turn, 1 / fold, fold, scale, a1, b1, c1, a2, b2, c2, k, d): the n-fold symmetry folds the plane
    into a wedge of angle fold = 2 pi / n around the first tip, where the shape is a1 x + b1 y < c1 and
    a2 x + b2 y < c2; (k, d): its reach (_reach)."""
    rows = [[turn, n / (2 * math.pi), 2 * math.pi / n, scale, *plane1, *plane2, *_reach(n, plane1, plane2)]
            for n, turn, scale, plane1, plane2 in SHAPES.values()]
    return torch.tensor(rows, device=device)


def coverage(x, y, shape, radius, angle, pixel):
    """Anti-aliased coverage in [0, 1] of shapes seen from sampling offsets x [N, 1, W], y [N, H, 1] to their centres
    (image units); shape, radius, angle, pixel (a pixel's width in image units): [N]. Returns [N, H, W]."""
    p = _tables(x.device, x.shape[-1])["shapes"][shape]  # (N, 12)
    angle = angle + p[:, 0]
    return _coverage(x, y, p, angle.cos(), angle.sin(), radius, pixel)


def _coverage(x, y, p, cos, sin, radius, pixel):
    """coverage() given the shapes' rows p [N, 12] of the table and the cos and sin of their turned angles [N]."""
    p = p[:, :, None, None]  # (N, 12, 1, 1)
    cos, sin = cos[:, None, None], sin[:, None, None]
    u = x * cos + y * sin  # (N, H, W) in the shape's frame
    v = y * cos - x * sin
    rho = torch.hypot(u, v)
    # the angle from the nearest tip, in [0, fold / 2]: fold the plane onto the first wedge
    # (+ 32: whole wedges that keep frac's argument positive for n <= 64; + 0.5 and - 0.5 centre the wedge on the tip)
    psi = torch.atan2(v, u).mul_(p[:, 1]).add_(32.5).frac_().sub_(0.5).abs_().mul_(p[:, 2])
    c, s = psi.cos().mul_(rho), psi.sin().mul_(rho)  # coordinates in the first wedge
    R = radius[:, None, None] * p[:, 3]  # circumradius
    sdf = torch.maximum(torch.addcmul(c * p[:, 4], s, p[:, 5]).sub_(R * p[:, 6]),
                        torch.addcmul(c * p[:, 7], s, p[:, 8]).sub_(R * p[:, 9]))
    return sdf.mul_(-1 / pixel[:, None, None]).add_(0.5).clamp_(0, 1)


def _window(start, step, centre, reach, size):
    """Along one axis of sampling coordinates start + step (i + 1/2), i < size: the first pixel within `reach` of
    `centre` and how many are, [N] each (long); a margin of 1e-4 image units against rounding."""
    first = ((centre - reach - 1e-4 - start) / step - 0.5).ceil().clamp(0, size - 1)
    last = ((centre + reach + 1e-4 - start) / step - 0.5).floor().clamp(0, size - 1)
    return first.long(), (last - first + 1).clamp(min=1).long()


def windows(X, Y, step, cx, cy, shape, radius, angle, pixel):
    """coverage() of shapes centred at (cx, cy) [N], seen from sampling coordinates X [N, 1, W], Y [N, H, 1] spaced
    step = (sx, sy) [N] apart, bit for bit, but only in a window around each shape (about a quarter of a 32 px
    picture; coverage is 0 outside). Yields (members [n], where [n, h w], alpha [n, h w]): shapes `members` by window
    size (h, w), h w a multiple of 32, and their windows' pixels (flat indices into H W). A group is padded to a
    multiple of the thread count with repeats of its last shape; then every per-pixel op runs whole vectors as on the
    full picture (atan2's vector and scalar paths differ in the last bit; the other ops agree)."""
    N, H, W, device = len(cx), Y.shape[1], X.shape[2], cx.device
    p = _tables(device, W)["shapes"][shape]  # (N, 12)
    angle = angle + p[:, 0]
    cos, sin = angle.cos(), angle.sin()
    reach = radius * p[:, 3] * p[:, 10] + 0.5 * pixel * p[:, 11]  # k R + d e (_reach)
    j0, nx = _window(X[:, 0, 0] - 0.5 * step[0], step[0], cx, reach, W)
    i0, ny = _window(Y[:, 0, 0] - 0.5 * step[1], step[1], cy, reach, H)
    wy, wx = (ny + 3) // 4 * 4, (nx + 3) // 4 * 4  # multiples of 4, one of them of 8: a multiple of 32 pixels
    wx = torch.where((wy % 8 != 0) & (wx % 8 != 0), wx + 4, wx)
    wy, wx = wy.clamp(max=H), wx.clamp(max=W)
    i0, j0 = torch.minimum(i0, H - wy), torch.minimum(j0, W - wx)  # the window inside the picture
    key = wy * (W + 1) + wx
    for k in key.unique().tolist():
        h, w = divmod(k, W + 1)
        members = (key == k).nonzero()[:, 0]
        members = torch.cat([members, members[-1:].expand(-len(members) % torch.get_num_threads())])
        rows = i0[members, None] + torch.arange(h, device=device)  # (n, h)
        cols = j0[members, None] + torch.arange(w, device=device)  # (n, w)
        x = X[members, 0].gather(1, cols)[:, None, :] - cx[members, None, None]  # (n, 1, w)
        y = Y[members, :, 0].gather(1, rows)[:, :, None] - cy[members, None, None]  # (n, h, 1)
        alpha = _coverage(x, y, p[members], cos[members], sin[members], radius[members], pixel[members])  # (n, h, w)
        yield members, (rows[:, :, None] * W + cols[:, None, :]).flatten(1), alpha.flatten(1)


_TABLES = {}


def _tables(device, image_size=IMAGE_SIZE):
    """Constant tables on `device`: shapes, colours and the noise bank (drawn once, on the CPU, from a fixed seed)."""
    key = (str(device), image_size)
    if key not in _TABLES:
        noise = torch.randn(NOISE_TILES, image_size, image_size, generator=torch.Generator().manual_seed(0))
        _TABLES[key] = dict(shapes=_shape_table(device), colours=torch.tensor(list(COLOURS.values()), device=device),
                            mean=torch.tensor(MEAN, device=device), std=torch.tensor(STD, device=device),
                            noise=noise.to(device))
    return _TABLES[key]


def view(seed, epoch, index, augment):
    """The crop of each picture, (x0, y0, w, h) in image units [B] each: RandomResizedCrop's scale 0.9-1 and
    aspect ratio 3/4-4/3, drawn from (seed, epoch, index); the whole picture without augmentation."""
    index = torch.as_tensor(index, dtype=torch.long)
    if not augment:
        one = torch.ones(len(index), device=index.device)
        return 0 * one, 0 * one, one, one
    u = uniform(hash32(seed, CROP_STREAM, epoch, index[:, None], torch.arange(4, device=index.device)))  # (B, 4)
    area = 0.9 + 0.1 * u[:, 0]  # open_clip's scale (0.9, 1), uniform
    ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1])  # torchvision's, log-uniform
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    return (1 - w) * u[:, 2], (1 - h) * u[:, 3], w, h


def render(attrs, crop, image_size=IMAGE_SIZE):
    """Pictures of `attrs` (scene()) seen through `crop` (view()): normalised float32 [B, 3, H, W]. Normalising is
    affine, so it is applied to the colours, the background and the noise rather than to every composited pixel."""
    t = _tables(attrs["cx"].device, image_size)
    x0, y0, w, h = crop
    B, device = len(x0), x0.device
    grid = (torch.arange(image_size, device=device) + 0.5) / image_size
    X = (x0[:, None] + w[:, None] * grid)[:, None, :]  # (B, 1, W) sampling coordinates, image units
    Y = (y0[:, None] + h[:, None] * grid)[:, :, None]  # (B, H, 1)
    pixel = (w * h).sqrt() / image_size  # a pixel's width in image units
    scale, shift = (1 / t["std"])[:, None, None], (-t["mean"] / t["std"])[:, None, None]  # (3, 1, 1)
    background = attrs["background"]
    # a grey level in [0.25, 0.6] and a slope of at most 0.125 per image width, the same along x and y
    grey, slope = 0.25 + 0.35 * background[:, 0, None, None], 0.25 * (background[:, 1, None, None] - 0.5)
    grey = (grey + slope * (X - 0.5)) + slope * (Y - 0.5)  # (B, H, W): a gentle gradient
    # (B, 3, H, W), normalised; shift made whole planes for addcmul's vector path (the same values, faster)
    image = torch.addcmul(shift.expand(3, image_size, image_size).contiguous(), grey[:, None], scale)
    # the objects: slot 0 of every picture, then slot 1 of the pictures that hold two
    second = (attrs["count"] > 1).nonzero()[:, 0]
    picture = torch.cat([torch.arange(B, device=device), second])  # (N,)
    slot = torch.cat([torch.zeros(B, dtype=torch.long, device=device), torch.ones_like(second)])
    alpha = torch.zeros(len(picture) * image_size ** 2, device=device)  # (N H W,): 0 outside the windows
    for members, where, window in windows(X[picture], Y[picture], (w[picture] / image_size, h[picture] / image_size),
                                          attrs["cx"][picture, slot], attrs["cy"][picture, slot],
                                          attrs["shape"][picture, slot], attrs["radius"][picture, slot],
                                          attrs["angle"][picture, slot], pixel[picture]):
        where = where + members[:, None] * image_size ** 2  # into the flat (N H W,)
        alpha.scatter_(0, where.flatten(), window.flatten())  # a repeated shape writes the same values twice
    alpha = alpha.view(-1, image_size, image_size)  # (N, H, W)
    tint = attrs["tint"].view(B, 2, 3)[picture, slot]
    rgb = t["colours"][attrs["colour"][picture, slot]] + COLOUR_JITTER * (2 * tint - 1)  # (N, 3)
    rgb = torch.addcmul(shift, rgb[:, :, None, None], scale)  # (N, 3, 1, 1), normalised
    image = torch.lerp(image, rgb[:B], alpha[:B, None])
    image[second] = torch.lerp(image[second], rgb[B:], alpha[B:, None])
    noise = t["noise"][pick(background[:, 2], NOISE_TILES)]  # (B, H, W)
    return image.addcmul_(noise[:, None], NOISE * scale)


# -----------------------------------------------------------------------------
# captions


def caption_fields(attrs):
    """Field name -> value index [B] per picture (slot 0 and slot 1 of the two-object picture)."""
    return {"colour": attrs["colour"][:, 0], "shape": attrs["shape"][:, 0], "size": attrs["size"][:, 0],
            "where": attrs["position"][:, 0], "relation": attrs["relation"].clamp(min=0),
            "colour2": attrs["colour"][:, 1], "shape2": attrs["shape"][:, 1]}


FIELD_VALUES = {"colour": tuple(COLOURS), "shape": tuple(SHAPES), "size": SIZES, "where": POSITIONS,
                "relation": RELATIONS, "colour2": tuple(COLOURS), "shape2": tuple(SHAPES)}


def caption_text(attrs, i, template):
    """The caption of picture i (a row of attrs) by template number `template` of its kind: a str."""
    fields = {name: FIELD_VALUES[name][int(v[i])] for name, v in caption_fields(attrs).items()}
    templates = TWO if int(attrs["count"][i]) == 2 else ONE
    return templates[template % len(templates)].format(**fields)


class Captions:
    """Tokens of captions assembled from pre-tokenised words with tensor ops. A caption is words joined by single
    spaces; with the byte tokenizer and CLIP's BPE its ids are its words' ids joined by a separator's ids."""

    def __init__(self, tokenizer, context_length, device):
        self.C, self.device = context_length, device
        self.sot, self.eot = tokenizer.sot, tokenizer.eot
        a, b, ab = tokenizer.encode("a"), tokenizer.encode("b"), tokenizer.encode("a b")
        self.sep = ab[len(a):len(ab) - len(b)]  # byte: the space; BPE: nothing
        pieces, self.base = [""], {}  # piece 0: empty, pads short templates
        for name, values in FIELD_VALUES.items():
            self.base[name] = len(pieces)
            pieces += list(values)
        slots = []
        for templates in (ONE, TWO):
            rows = []
            for template in templates:
                row = []
                for word in template.split():
                    if word.startswith("{"):
                        row.append(-1 - list(FIELD_VALUES).index(word[1:-1]))  # a field: < 0
                    else:
                        if word not in pieces:
                            pieces.append(word)
                        row.append(pieces.index(word))
                rows.append(row)
            slots.append(rows)
        ids = [sum((tokenizer.encode(w) + self.sep for w in piece.split()), []) for piece in pieces]
        width = max(len(x) for x in ids)
        self.ids = torch.tensor([x + [0] * (width - len(x)) for x in ids], device=device)  # (P, L)
        self.lengths = torch.tensor([len(x) for x in ids], device=device)  # (P,)
        S = max(len(r) for rows in slots for r in rows)
        self.slots = [torch.tensor([r + [0] * (S - len(r)) for r in rows], device=device) for rows in slots]
        self.field_base = torch.tensor(list(self.base.values()), device=device)

    def __call__(self, attrs, template):
        """Tokens [B, C] of each picture's caption number template[b] (long [B]) of its kind."""
        fields = torch.stack(list(caption_fields(attrs).values()), 1) + self.field_base  # (B, F) piece indices
        two = attrs["count"] == 2
        one_slots = self.slots[0][template % len(ONE)]  # (B, S)
        two_slots = self.slots[1][template % len(TWO)]
        slots = torch.where(two[:, None], two_slots, one_slots)
        piece = torch.where(slots < 0, fields.gather(1, (-1 - slots).clamp(min=0)), slots)  # (B, S)
        return self.assemble(piece)

    def assemble(self, piece):
        """Pieces [N, S] -> tokens [N, C]: SOT, the pieces' ids (less the last separator), EOT, padding."""
        ids, lengths = self.ids[piece], self.lengths[piece]  # (N, S, L), (N, S)
        N, S, L = ids.shape
        start = 1 + lengths.cumsum(1) - lengths  # (N, S) where each piece begins
        pos = start[:, :, None] + torch.arange(L, device=ids.device)  # (N, S, L)
        end = 1 + lengths.sum(1) - len(self.sep)  # (N,) where EOT goes
        keep = (torch.arange(L, device=ids.device) < lengths[:, :, None]) & (pos < end[:, None, None])
        keep &= pos < self.C - 1  # a caption too long is cut, and ends with EOT (as tokenizer.py does)
        out = torch.zeros(N, self.C + 1, dtype=torch.long, device=ids.device)
        out.scatter_(1, torch.where(keep, pos, self.C).flatten(1), ids.flatten(1))  # column C takes the rest
        out[:, 0] = self.sot
        out.scatter_(1, end.clamp(max=self.C - 1)[:, None], self.eot)
        return out[:, :self.C]


# -----------------------------------------------------------------------------
# training batches


class TrainData:
    """Training batches of one rank, drawn on `device`. The order of an epoch is a permutation drawn from
    (seed, epoch); global batches of batch_size * world_size pictures are consecutive slices of it and rank r takes
    the r-th part of each. The last incomplete global batch is dropped. Augmentation and caption choice come from
    (seed, epoch, index). Nothing touches the caller's RNG."""

    def __init__(self, num_samples, batch_size, seed, rank=0, world_size=1, tokenizer=None,
                 context_length=CONTEXT_LENGTH, image_size=IMAGE_SIZE, device="cpu", captions_per_image=1):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.image_size, self.device, self.k = image_size, torch.device(device), captions_per_image
        self.steps_per_epoch = runtime.steps_per_epoch(num_samples, batch_size, world_size)
        self.captions = Captions(tokenizer, context_length, self.device)
        self.skipped = Counter()  # never a bad sample here; kept for the interface of data.TrainData
        self.sharded = False  # the batch order never depends on workers (data.TrainData's interface)

    def order(self, epoch):
        """The permutation of the epoch: pictures sorted by a hash of (seed, epoch, index)."""
        keys = hash32(self.seed, ORDER_STREAM, epoch, torch.arange(self.num_samples, device=self.device))
        return keys.argsort()  # ties broken by index, on every device (hash32 is a bijection of index only mod 2^32)

    def batch(self, epoch, index):
        """(images [B,3,H,W], tokens [B,C] or [B,k,C]) of training pictures `index` (long [B]) in `epoch`."""
        attrs = scene(self.seed, "train", index)
        images = render(attrs, view(self.seed, epoch, index, augment=True), self.image_size)
        n = len(ONE) * len(TWO)  # a multiple of both template counts
        u = uniform(hash32(self.seed, CAPTION_STREAM, epoch, index[:, None], torch.arange(self.k, device=index.device)))
        choice = pick(u, n)
        if self.k > 1:  # k different paraphrases where there are k
            choice = (choice[:, :1] + torch.arange(self.k, device=index.device)) % n
        tokens = torch.stack([self.captions(attrs, choice[:, j]) for j in range(self.k)], 1)  # (B, k, C)
        return images, tokens[:, 0] if self.k == 1 else tokens

    def batches(self, epoch, start_step=0):
        """Yield (images, tokens) for steps start_step.. of `epoch`, on the device."""
        order = self.order(epoch)
        for step in range(start_step, self.steps_per_epoch):
            yield self.batch(epoch, order[runtime.rank_slice(step, self.batch_size, self.rank, self.world_size)])


# -----------------------------------------------------------------------------
# evaluation sets


_HELD_OUT = {}  # (seed, split, n, image_size, device) -> (images, attrs): the held-out pictures of one data shape


def pictures(seed, split, n, image_size=IMAGE_SIZE, device="cpu"):
    """Pictures 0..n-1 of a held-out split, unaugmented: (images [n,3,H,W], attrs). Rendered once per process and
    shape (each chain stage and train.py's checks ask again for the same evaluation sets); the tensors are shared,
    so callers must not change them in place. Another seed, picture size or device clears the cache."""
    key = (seed, split, n, image_size, str(torch.device(device)))
    if any(k[0] != key[0] or k[3:] != key[3:] for k in _HELD_OUT):
        _HELD_OUT.clear()  # one data shape at a time: at 224 px the probe pictures alone hold 3.6 GB
    if key not in _HELD_OUT:
        index = torch.arange(n, device=device)
        attrs = scene(seed, split, index)
        _HELD_OUT[key] = render(attrs, view(seed, 0, index, augment=False), image_size), attrs
    images, attrs = _HELD_OUT[key]
    return images, dict(attrs)


def probe_labels(attrs):
    """Attribute -> labels [B]: the value's index in ATTRIBUTES; the object's attributes on one-object pictures, the
    relation on two-object ones, -1 where an attribute does not apply."""
    one = (attrs["count"] == 1)[:, None]
    labels = {name: torch.where(one, attrs[name], -1)[:, 0] for name in ("colour", "shape", "size", "position")}
    return dict(labels, count=attrs["count"] - 1, relation=attrs["relation"])


def build_eval_sets(tokenizer, context_length=CONTEXT_LENGTH, image_size=IMAGE_SIZE, seed=0, batch_size=256,
                    device="cpu", zeroshot_per_class=ZEROSHOT_PER_CLASS, retrieval_size=RETRIEVAL_SIZE,
                    probe_sizes=(PROBES, PROBES // 2)):
    """The held-out evaluation sets of the synthetic set, in memory:

    "zeroshot": dict(batches=[(images [b,3,H,W], labels long [b])], classnames, templates, tokens long [n, t, C])
    "retrieval": dict(batches=[(images [b,3,H,W], tokens long [b, k, C])]), k = FULL_CAPTIONS
    "probes": dict(train=(images [n,3,H,W], {attribute: labels long [n]}), test=(...)), the linear probes'
              sets (evaluate.attribute_probes); a label is -1 where the attribute does not apply to the picture;
              absent when a probe size is 0
    """
    sets = {}
    n = zeroshot_per_class * len(CLASSNAMES)
    images, attrs = pictures(seed, "zeroshot", n, image_size, device)
    labels = attrs["colour"][:, 0] * len(SHAPES) + attrs["shape"][:, 0]
    sets["zeroshot"] = dict(batches=list(zip(images.split(batch_size), labels.split(batch_size))),
                            classnames=list(CLASSNAMES), templates=list(TEMPLATES),
                            tokens=prompt_tokens(tokenizer, CLASSNAMES, TEMPLATES, context_length).to(device))
    images, attrs = pictures(seed, "retrieval", retrieval_size, image_size, device)
    captions = Captions(tokenizer, context_length, device)
    tokens = torch.stack([captions(attrs, torch.full_like(attrs["count"], j)) for j in range(FULL_CAPTIONS)], 1)
    sets["retrieval"] = dict(batches=list(zip(images.split(batch_size), tokens.split(batch_size))))
    if min(probe_sizes) > 0:
        sets["probes"] = {}
        for part, size in zip(("train", "test"), probe_sizes):
            images, attrs = pictures(seed, f"probe-{part}", size, image_size, device)
            sets["probes"][part] = (images, probe_labels(attrs))
    return sets
