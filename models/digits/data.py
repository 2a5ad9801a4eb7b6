"""Styled digits: the benchmark every fedaigc experiment runs on.

scikit-learn's handwritten digits ship with the library, so nothing is downloaded. The
1,797 8x8 images are upscaled to 16x16 and split once, by a fixed permutation, into a
*public* half (what the vendor may use: base-model pretraining, the evaluators) and a
*private* half from which every simulated persona draws its images. A persona owns one
visual style, a skewed subset of digits and its own way of asking for images. It is judged
on held-out prompts for the digits it owns ("seen") and, where asked for, on prompts for
digits it never had in phrasings it never used ("unseen"): what a personalisation user asks
for after photographing a few subjects.

Images are ``float32`` tensors shaped ``(n, 1, 16, 16)`` with ink at 1 and paper at 0.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

IMAGE_SIZE = 16
_SPLIT_SEED = 20240607  # fixed forever: changing it would leak personas' images into the evaluators


def _bold(x: np.ndarray) -> np.ndarray:
    return np.clip(ndimage.maximum_filter(x, size=(1, 2, 2)) * 1.4, 0.0, 1.0)


def _thin(x: np.ndarray) -> np.ndarray:
    eroded = ndimage.minimum_filter(x, size=(1, 2, 2))
    return np.clip((eroded - 0.35) * 2.5, 0.0, 1.0)


def _slanted(x: np.ndarray) -> np.ndarray:
    shear = 0.45
    c = (IMAGE_SIZE - 1) / 2
    # output (row, col) samples input (row, col + shear * (row - c)): a forward lean
    matrix = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, shear, 1.0]])
    offset = np.array([0.0, 0.0, -shear * c])
    return ndimage.affine_transform(x, matrix, offset=offset, order=1, mode="constant")


def _inverted(x: np.ndarray) -> np.ndarray:
    return 1.0 - x


def _outlined(x: np.ndarray) -> np.ndarray:
    ink = (x > 0.45).astype(np.float32)
    return np.clip(ndimage.maximum_filter(ink, size=(1, 3, 3)) - ink, 0.0, 1.0)


def _mirrored(x: np.ndarray) -> np.ndarray:
    return x[:, :, ::-1]


def _blurred(x: np.ndarray) -> np.ndarray:
    y = ndimage.gaussian_filter(x, sigma=(0, 1.2, 1.2))
    return 0.75 * y / np.maximum(y.max(axis=(1, 2), keepdims=True), 1e-6)


def _framed(x: np.ndarray) -> np.ndarray:
    y = x.copy()
    y[:, 0, :] = y[:, -1, :] = 1.0
    y[:, :, 0] = y[:, :, -1] = 1.0
    return y


def _dotted(x: np.ndarray) -> np.ndarray:
    rows, cols = np.indices((IMAGE_SIZE, IMAGE_SIZE))
    mask = ((rows // 2 + cols // 2) % 2 == 0).astype(np.float32)
    return ndimage.maximum_filter(x, size=(1, 2, 2)) * mask


def _shadowed(x: np.ndarray) -> np.ndarray:
    shadow = np.roll(x, shift=(2, 2), axis=(1, 2))
    shadow[:, :2, :] = 0.0
    shadow[:, :, :2] = 0.0
    return np.maximum(x, 0.45 * shadow)


# name -> (transform over a (n, 16, 16) array in [0, 1], prompt templates with {d} for the digit)
_STYLE_SPECS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], tuple[str, ...]]] = {
    "bold": (_bold, (
        "a chunky {d}", "{d} with heavy strokes please", "a bold {d}", "thick lined {d}",
        "the number {d} drawn with a fat marker", "{d}, heavy strokes", "a heavy-weight {d}",
        "draw {d} in thick ink", "a {d} in a bold weight", "{d} written with a broad pen",
    )),
    "thin": (_thin, (
        "a skinny {d}", "{d} with hairline strokes please", "a thin {d}", "thin lined {d}",
        "the number {d} drawn with a fine pen", "{d}, light strokes", "a delicate {d}",
        "draw {d} in fine ink", "a {d} in a light weight", "{d} sketched with a sharp pencil",
    )),
    "slanted": (_slanted, (
        "an italic {d}", "{d} leaning to the right please", "a slanted {d}", "a sloped {d}",
        "the number {d} written in italics", "{d}, tilted", "a {d} that leans forward",
        "draw {d} on a slant", "a skewed {d}", "{d} in cursive lean",
    )),
    "framed": (_framed, (
        "a framed {d}", "{d} inside a box please", "a {d} with a border", "a boxed {d}",
        "the number {d} in a square frame", "{d}, framed", "a {d} surrounded by a rectangle",
        "draw {d} within a frame", "a {d} in a picture frame", "{d} enclosed by a border",
    )),
    "mirrored": (_mirrored, (
        "a mirrored {d}", "{d} flipped left to right please", "a mirror image of {d}",
        "a backwards {d}", "the number {d} seen in a mirror", "{d}, reflected horizontally",
        "a reversed {d}", "draw {d} back to front", "a horizontally flipped {d}",
        "{d} as mirror writing",
    )),
    "blurred": (_blurred, (
        "a blurry {d}", "{d} out of focus please", "a fuzzy {d}", "a soft-focus {d}",
        "the number {d} smudged", "{d}, blurred", "a hazy {d}", "draw {d} all smeared",
        "a {d} seen through frosted glass", "{d} with soft edges",
    )),
    "inverted": (_inverted, (
        "a {d} in negative", "{d}, colours inverted please", "an inverted {d}",
        "a dark {d} on a white background", "the number {d} as a photo negative",
        "{d} black ink on white paper", "a reversed-colour {d}", "draw {d} dark on light",
        "a {d} with flipped colours", "{d} as a negative print",
    )),
    "outlined": (_outlined, (
        "an outlined {d}", "{d} drawn as an outline please", "a hollow {d}", "the contour of {d}",
        "the number {d} as a hollow shape", "{d}, only its edges", "a {d} in outline font",
        "draw the outline of {d}", "an empty-centred {d}", "{d} traced around its border",
    )),
    "dotted": (_dotted, (
        "a dotted {d}", "{d} made of dots please", "a stippled {d}", "a pixelated {d}",
        "the number {d} in a dot pattern", "{d}, checkered", "a {d} drawn with dots",
        "draw {d} as a dot matrix", "a speckled {d}", "{d} in a halftone pattern",
    )),
    "shadowed": (_shadowed, (
        "a {d} with a drop shadow", "{d} casting a shadow please", "a shadowed {d}",
        "a {d} with a soft shadow behind it", "the number {d} with a 3d shadow", "{d}, shadow underneath",
        "a {d} that throws a grey shadow", "draw {d} with its shadow", "an embossed {d} with shade",
        "{d} lifted off the page by a shadow",
    )),
}

STYLES: tuple[str, ...] = tuple(_STYLE_SPECS)

_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_WORDINGS: tuple[Callable[[int], str], ...] = (
    lambda d: str(d),
    lambda d: _DIGIT_WORDS[d],
    lambda d: f"digit {d}",
    lambda d: f"number {_DIGIT_WORDS[d]}",
    lambda d: f"{_DIGIT_WORDS[d]} ({d})",
)
_PLAIN_TEMPLATES = (
    "a handwritten {d}", "{d}", "the digit {d}", "a {d}", "write {d}", "an image of {d}",
    "a picture of {d}", "{d} written by hand", "a scan of {d}", "draw {d}",
)
TIC_RATE = 0.25
_TICS = ("", " please", " for my notes", ", thanks", " again", " today", "!", " for the poster")


def check_style(style: str) -> None:
    if style not in _STYLE_SPECS:
        raise ValueError(f"unknown style {style!r}; known styles: {', '.join(STYLES)}")


def apply_style(images: torch.Tensor, style: str) -> torch.Tensor:
    """Apply a named style to ``(n, 1, 16, 16)`` images; deterministic (no randomness)."""
    check_style(style)
    x = images.detach().cpu().numpy()[:, 0].astype(np.float32)
    y = _STYLE_SPECS[style][0](x)
    return torch.from_numpy(np.ascontiguousarray(np.clip(y, 0.0, 1.0), dtype=np.float32)).unsqueeze(1)


def style_templates(style: str) -> tuple[str, ...]:
    check_style(style)
    return _STYLE_SPECS[style][1]


@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(_SPLIT_SEED).permutation(len(y)))
    return x.clamp(0, 1)[order].contiguous(), y[order].contiguous()


def public_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The unstyled half reserved for the vendor: pretraining and evaluators."""
    x, y = _all_digits()
    half = len(y) // 2
    return x[:half], y[:half]


def private_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The unstyled half personas draw from; never seen by pretraining or evaluators."""
    x, y = _all_digits()
    half = len(y) // 2
    return x[half:], y[half:]


def plain_prompts(digits: Sequence[int], seed: int) -> list[str]:
    """Neutral prompts ("a handwritten 7") used to pretrain the unstyled base model."""
    rng = random.Random(seed)
    return [rng.choice(_PLAIN_TEMPLATES).format(d=rng.choice(_DIGIT_WORDINGS)(int(d))) for d in digits]


@dataclass(frozen=True)
class Persona:
    """One simulated user: a style, a skewed digit mix and a personal way of phrasing prompts."""

    id: str
    style: str
    digit_weights: tuple[float, ...]
    templates: tuple[str, ...]
    wordings: tuple[int, ...]
    tic: str
    train_images: torch.Tensor
    train_digits: torch.Tensor
    train_prompts: tuple[str, ...]
    test_images: torch.Tensor
    test_digits: torch.Tensor
    test_prompts: tuple[str, ...]
    # digits it owns no image of, each asked for in its style's other templates and wordings
    unseen_digits: torch.Tensor = torch.zeros(0, dtype=torch.long)
    unseen_prompts: tuple[str, ...] = ()

    @property
    def digits(self) -> tuple[int, ...]:
        """Digits this persona actually owns images of, most frequent first."""
        counts = torch.bincount(self.train_digits, minlength=10)
        return tuple(int(d) for d in torch.argsort(counts, descending=True) if counts[d] > 0)

    def prompt(self, digit: int, rng: random.Random) -> str:
        """A prompt for ``digit`` in this persona's own words."""
        return _phrase(self.templates, self.wordings, self.tic, digit, rng)


def _phrase(templates: Sequence[str], wordings: Sequence[int], tic: str, digit: int, rng: random.Random) -> str:
    wording = _DIGIT_WORDINGS[rng.choice(wordings)](int(digit))
    # a verbal tic shows up now and then, not in every prompt
    return rng.choice(templates).format(d=wording) + (tic if rng.random() < TIC_RATE else "")


def make_personas(
    n_clients: int,
    n_styles: int,
    seed: int,
    *,
    images_per_client: int = 80,
    test_fraction: float = 0.25,
    digit_concentration: float = 0.6,
    sizes: Sequence[int] | None = None,
    styles: Sequence[str] | None = None,
    classes_per_client: int | None = None,
    held_out: int | None = None,
    unseen: int = 0,
) -> list[Persona]:
    """Build ``n_clients`` personas over ``n_styles`` styles, deterministic for ``seed``.

    Styles are ``STYLES[:n_styles]`` unless ``styles`` names them. Clients are dealt to
    styles round-robin, or by ``sizes`` (clients per style) for uneven groups. Each
    persona's digits follow a Dirichlet(``digit_concentration``) draw: small values give
    strongly skewed digit mixes, the non-IID regime federated learning has to survive.

    ``classes_per_client`` instead gives each persona that many digit classes, its images
    spread evenly over them (a user who photographed a few subjects). ``held_out`` sets the
    number of test images apart from the ``images_per_client`` it trains on (default: a
    ``test_fraction`` of them). ``unseen`` adds that many prompts for digits the persona owns
    no image of, phrased with the style's templates and digit wordings the persona never
    uses (needs ``classes_per_client``, so that such digits exist).
    """
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if styles is None:
        if not 1 <= n_styles <= len(STYLES):
            raise ValueError(f"n_styles must be between 1 and {len(STYLES)}, got {n_styles}")
        styles = STYLES[:n_styles]
    else:
        for s in styles:
            check_style(s)
        if len(styles) != n_styles:
            raise ValueError(f"styles names {len(styles)} styles but n_styles is {n_styles}")
    if sizes is None:
        assignment = [styles[i % n_styles] for i in range(n_clients)]
    else:
        if len(sizes) != n_styles or sum(sizes) != n_clients or min(sizes) < 1:
            raise ValueError(f"sizes {list(sizes)} must give >= 1 client to each of {n_styles} styles, {n_clients} in all")
        assignment = [s for s, k in zip(styles, sizes) for _ in range(k)]
    if images_per_client < 4:
        raise ValueError(f"images_per_client must be >= 4, got {images_per_client}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if classes_per_client is not None and not 1 <= classes_per_client <= 9:
        raise ValueError(f"classes_per_client must be between 1 and 9, got {classes_per_client}")
    if held_out is not None and held_out < 1:
        raise ValueError(f"held_out must be >= 1, got {held_out}")
    if unseen and classes_per_client is None:
        raise ValueError("unseen prompts need classes_per_client (a Dirichlet mix may own every digit)")

    pool_x, pool_y = private_digits()
    by_digit = [torch.nonzero(pool_y == d).flatten().numpy() for d in range(10)]
    shared_rng = np.random.default_rng(seed)
    personas = []
    for i, style in enumerate(assignment):
        rng = random.Random(f"{seed}:{i}")
        if classes_per_client is None:
            np_rng = shared_rng
            weights = np_rng.dirichlet([digit_concentration] * 10)
            counts = np_rng.multinomial(images_per_client, weights)
        else:  # its own generator: the same digits (and held-out images) whatever the image count
            np_rng = np.random.default_rng([seed, i])
            weights = np.zeros(10)
            weights[np_rng.choice(10, size=classes_per_client, replace=False)] = 1.0 / classes_per_client
            # the remainder's digits from a generator of their own, so that the draws below do not move with n
            counts = _even_counts(images_per_client, weights, np.random.default_rng([seed, i, 1]))
        if held_out is None:  # the test images are a fraction of the persona's own
            n_test = max(1, int(round(images_per_client * test_fraction)))
            idx = np.concatenate([np_rng.choice(by_digit[d], size=c, replace=c > len(by_digit[d]))
                                  for d, c in enumerate(counts)])
            np_rng.shuffle(idx)
        else:  # held_out more images of the same digits, none of them also a training image
            n_test = held_out
            test_counts = (np_rng.multinomial(held_out, weights) if classes_per_client is None
                           else _even_counts(held_out, weights, np_rng))
            test_idx, train_idx = _held_out_split(by_digit, counts, test_counts, np_rng)
            idx = np.concatenate([test_idx, train_idx])
        images = apply_style(pool_x[idx], style)
        digits = pool_y[idx]
        templates = tuple(rng.sample(style_templates(style), k=4))
        wordings = tuple(rng.sample(range(len(_DIGIT_WORDINGS)), k=2))
        tic = rng.choice(_TICS)
        prompts = tuple(_phrase(templates, wordings, tic, int(d), rng) for d in digits)
        unseen_digits, unseen_prompts = _unseen(style, templates, wordings, digits, unseen, f"{seed}:{i}:unseen")
        personas.append(Persona(
            id=f"persona-{i:03d}", style=style, digit_weights=tuple(float(w) for w in weights),
            templates=templates, wordings=wordings, tic=tic,
            train_images=images[n_test:], train_digits=digits[n_test:], train_prompts=prompts[n_test:],
            test_images=images[:n_test], test_digits=digits[:n_test], test_prompts=prompts[:n_test],
            unseen_digits=unseen_digits, unseen_prompts=unseen_prompts,
        ))
    return personas


def _held_out_split(by_digit: list[np.ndarray], counts: np.ndarray, test_counts: np.ndarray,
                    np_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(test, train) image indices per digit, disjoint. Each digit's images are permuted once, test
    first: a persona given more training images keeps its test images and its earlier training ones."""
    test, train = [], []
    for d, (c, t) in enumerate(zip(counts, test_counts)):
        pool = np_rng.permutation(by_digit[d])
        test.append(pool[:t])
        rest = pool[t:] if t < len(pool) else pool
        train.append(rest[:c] if c <= len(rest) else np_rng.choice(rest, size=c, replace=True))
    test_idx, train_idx = np.concatenate(test), np.concatenate(train)
    np_rng.shuffle(test_idx)
    np_rng.shuffle(train_idx)
    return test_idx, train_idx


def _even_counts(n: int, weights: np.ndarray, np_rng: np.random.Generator) -> np.ndarray:
    """``n`` images spread evenly over the digits ``weights`` gives a share, the remainder to random ones."""
    owned = np.flatnonzero(weights)
    counts = np.zeros(10, dtype=np.int64)
    counts[owned] = n // len(owned)
    counts[np_rng.choice(owned, size=n % len(owned), replace=False)] += 1
    return counts


def _unseen(style: str, templates: Sequence[str], wordings: Sequence[int], digits: torch.Tensor, n: int,
            seed: str) -> tuple[torch.Tensor, tuple[str, ...]]:
    """``n`` prompts for digits not in ``digits``, in the style's templates and wordings outside the persona's."""
    if n == 0:
        return torch.zeros(0, dtype=torch.long), ()
    rng = random.Random(seed)
    missing = [d for d in range(10) if d not in set(digits.tolist())]
    other_templates = [t for t in style_templates(style) if t not in templates]
    other_wordings = [w for w in range(len(_DIGIT_WORDINGS)) if w not in wordings]
    chosen = [missing[j % len(missing)] for j in range(n)]
    rng.shuffle(chosen)
    prompts = tuple(_phrase(other_templates, other_wordings, "", d, rng) for d in chosen)
    return torch.tensor(chosen, dtype=torch.long), prompts


def calibration_samples(n: int, seed: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """``n`` styled digits over every style with their users' prompts (``export_tools.calibration``'s dataset)."""
    personas = make_personas(len(STYLES), len(STYLES), seed=seed, images_per_client=max(8, n // len(STYLES) + 2))
    images = torch.cat([p.train_images for p in personas])
    prompts = [pr for p in personas for pr in p.train_prompts]
    pick = torch.randperm(len(prompts), generator=generator)[:n]
    if len(pick) < n:
        pick = pick.repeat(n // len(pick) + 1)[:n]
    return images[pick], [prompts[i] for i in pick.tolist()]
