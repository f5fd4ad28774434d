"""A toy video world small enough to learn on a laptop, and measures that are exact in it.

Clips show one flat-coloured shape (circle, square or triangle) on a flat background, moving
left, right, up or down at one of three speeds, or staying still; the scene wraps around the
frame edges, so motion never stops. Each clip has the prompt that describes it ("a red circle
moves quickly left across a gray background"). Everything is deterministic by seed and
rendered with hard edges, so the colour and the motion of a clip can be read back exactly:
`colour_of` and `direction_of` recover the scene's colour and direction from pixels alone
(tested on every scene kind), which makes prompt adherence measurable without a learned model.

What a prompt leaves open is finite: the shape starts centred on one of GRID x GRID grid points and
has one of SIZES (and a static shape any speed). So the clips of a prompt are the torus translations
of a few base clips, and the world's optimal denoiser has a closed form (toyworld/exact.py).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from core.codecs.prompt_grammar import PromptGrammar, Slot

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 70), "blue": (40, 90, 235),
    "yellow": (240, 220, 40), "purple": (165, 60, 205), "white": (245, 245, 245)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (16, 16, 16), "gray": (120, 120, 120), "brown": (105, 70, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "static": (0, 0)}
SPEEDS: dict[str, float] = {"slowly": 0.5, "steadily": 1.0, "quickly": 1.5}  # pixels per frame at 32 px
GRID = 32  # start positions per axis: the centre starts on a pixel of the 32 x 32 world
SIZES = (0.125, 0.15625, 0.1875)  # half-extents in fractions of the frame: 4, 5 and 6 px at 32 px
STATIC_FRACTION = 0.2  # of scenes; the others move in one of the four directions, equally often


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    direction: str
    speed: str
    x0: float  # start centre, in fractions of the frame
    y0: float
    size: float  # half-extent in fractions of the frame

    @property
    def prompt(self) -> str:
        what = f"a {self.colour} {self.shape}"
        if self.direction == "static":
            return f"{what} stays still on a {self.background} background"
        return f"{what} moves {self.speed} {self.direction} across a {self.background} background"

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Scene":
        moving = [d for d in DIRECTIONS if d != "static"]
        direction = "static" if rng.random() < STATIC_FRACTION else moving[rng.integers(len(moving))]
        return cls(shape=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
                   background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], direction=direction,
                   speed=list(SPEEDS)[rng.integers(len(SPEEDS))], x0=float(rng.integers(GRID)) / GRID,
                   y0=float(rng.integers(GRID)) / GRID, size=SIZES[rng.integers(len(SIZES))])

    @classmethod
    def from_seed(cls, seed: int) -> "Scene":
        return cls.sample(np.random.default_rng(seed))

    def velocity(self, width: int) -> tuple[float, float]:
        """Pixels per frame (x, y) at this frame width."""
        dx, dy = DIRECTIONS[self.direction]
        v = SPEEDS[self.speed] * width / 32
        return dx * v, dy * v


@dataclass(frozen=True)
class Attributes:
    """What a prompt says: everything of a scene but where it starts and how big it is (and, for a static
    shape, its speed)."""

    shape: str
    colour: str
    background: str
    direction: str
    speed: str | None  # None for a static shape

    @property
    def prompt(self) -> str:
        return Scene(self.shape, self.colour, self.background, self.direction, self.speed or "slowly", 0, 0,
                     SIZES[0]).prompt

    @property
    def motion(self) -> tuple[str, str | None]:
        return self.direction, self.speed


_PROMPT = re.compile(r"a (?P<colour>\w+) (?P<shape>\w+) (?:stays still on|moves (?P<speed>\w+) (?P<direction>\w+) "
                     r"across) a (?P<background>\w+) background")


def parse_prompt(prompt: str) -> Attributes:
    """The attributes a world prompt states (the inverse of `Scene.prompt`); a ValueError naming the world's
    vocabulary for any other text."""
    m = _PROMPT.fullmatch(" ".join(prompt.lower().split()))
    attrs = None
    if m:
        attrs = Attributes(m["shape"], m["colour"], m["background"], m["direction"] or "static", m["speed"])
    if (attrs is None or attrs.shape not in SHAPES or attrs.colour not in COLOURS or attrs.background not in BACKGROUNDS
            or attrs.direction not in DIRECTIONS or (attrs.speed is not None and attrs.speed not in SPEEDS)):
        raise ValueError(f"{prompt!r} is not a prompt of the toy world: it says 'a <colour> <shape> moves <speed> "
                         f"<direction> across a <background> background' or 'a <colour> <shape> stays still on a "
                         f"<background> background', with colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; "
                         f"speeds {', '.join(SPEEDS)}; directions {', '.join(d for d in DIRECTIONS if d != 'static')}; "
                         f"backgrounds {', '.join(BACKGROUNDS)}")
    return attrs


def all_attributes() -> list[tuple[Attributes, float]]:
    """Every prompt of the world with its probability under `Scene.sample`."""
    moving = [d for d in DIRECTIONS if d != "static"]
    base = 1 / (len(SHAPES) * len(COLOURS) * len(BACKGROUNDS))
    out = []
    for shape, colour, background in itertools.product(SHAPES, COLOURS, BACKGROUNDS):
        out.append((Attributes(shape, colour, background, "static", None), base * STATIC_FRACTION))
        for direction, speed in itertools.product(moving, SPEEDS):
            out.append((Attributes(shape, colour, background, direction, speed),
                        base * (1 - STATIC_FRACTION) / (len(moving) * len(SPEEDS))))
    return out


def _inside(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Pixel centres (u, v relative to the shape's centre) covered by the shape of half-extent r."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return (np.abs(u) <= r) & (np.abs(v) <= r)
    return (v <= r) & (v >= -r) & (np.abs(u) <= (v + r) / 2)  # triangle pointing up


def shape_mask(scene: Scene, frames: int = 21, height: int = 32, width: int = 32) -> np.ndarray:
    """bool [frames, height, width]: the pixels the shape covers, wrapping around the edges."""
    vx, vy = scene.velocity(width)
    r = scene.size * min(height, width)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    mask = np.empty((frames, height, width), dtype=bool)
    for t in range(frames):
        cx, cy = (scene.x0 * width + vx * t) % width, (scene.y0 * height + vy * t) % height
        u = (xs - cx + width / 2) % width - width / 2  # torus: the nearest copy of the centre
        v = (ys - cy + height / 2) % height - height / 2
        mask[t] = _inside(scene.shape, u, v, r)
    return mask


def render(scene: Scene, frames: int = 21, height: int = 32, width: int = 32) -> np.ndarray:
    """uint8 [frames, height, width, 3] of `scene`: its colour where `shape_mask` is set, the background elsewhere."""
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    video[:] = BACKGROUNDS[scene.background]
    video[shape_mask(scene, frames, height, width)] = COLOURS[scene.colour]
    return video


def clips(n: int, seed: int = 0, frames: int = 21, height: int = 32, width: int = 32) -> list[tuple[Scene, np.ndarray]]:
    """`n` (scene, video) pairs; clip i is rendered from scene seed `seed + i`."""
    return [(s, render(s, frames, height, width)) for s in (Scene.from_seed(seed + i) for i in range(n))]


# ------------------------------------------------------------------------------------------------ tokenizer

VOCABULARY = ("a", "moves", "across", "background", "stays", "still", "on",
              *COLOURS, *BACKGROUNDS, *SHAPES, *DIRECTIONS, *SPEEDS)
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: umT5's pad, eos and unk ids


def write_tokenizer(folder: str | Path) -> None:
    """A word-level Hugging Face tokenizer of the world's prompts (one id per word, lower-cased, eos appended)
    into `folder`, for `text_encoder.tokenizer`. With the byte tokenizer, a colour word of another length
    shifts every later byte, so a small teacher must learn to spell before it can read the prompt; one id
    per word makes the prompt's attributes directly visible to cross-attention. Unknown words map to <unk>."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *sorted(set(VOCABULARY))))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))
    write_grammar(folder)


def grammar() -> PromptGrammar:
    """The world's prompts as a grammar: `Scene.prompt`'s two sentences and the words of each part."""
    return PromptGrammar(
        templates=("a <colour> <shape> moves <speed> <direction> across a <background> background",
                   "a <colour> <shape> stays still on a <background> background"),
        slots={"colour": Slot("shape colour", tuple(COLOURS)), "shape": Slot("shape", SHAPES),
               "speed": Slot("speed", tuple(SPEEDS)),
               "direction": Slot("direction", tuple(d for d in DIRECTIONS if d != "static")),
               "background": Slot("background", tuple(BACKGROUNDS))})


def write_grammar(folder: str | Path) -> None:
    """`grammar()` into the tokenizer folder `folder`, where a served model finds it: the page and /v1/info show
    it, and a prompt outside it gets a warning naming the part (core/codecs/prompt_grammar.py)."""
    grammar().write(folder)


# ------------------------------------------------------------------------------------------------ measures


def background_colour(video: np.ndarray) -> np.ndarray:
    """The most common colour of the frame border over the clip: the background, when the shape is smaller."""
    border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]]).reshape(-1, 3)
    colours, counts = np.unique(border, axis=0, return_counts=True)
    return colours[counts.argmax()].astype(np.float64)


def foreground(video: np.ndarray, tolerance: float = 40.0) -> np.ndarray:
    """bool [T, H, W]: pixels farther than `tolerance` (RGB distance) from the background colour."""
    return np.linalg.norm(video.astype(np.float64) - background_colour(video), axis=-1) > tolerance


def colour_of(video: np.ndarray) -> str | None:
    """The palette colour whose blends with the background explain the foreground pixels best; None when there
    is no foreground.

    Each foreground pixel is fitted as coverage a in [0, 1] of the colour over the background (a soft or dim
    edge is a partial coverage), and the colour with the smallest summed residual wins. A nearest-colour rule
    on raw pixels reads a dim white shape as purple, because purple lies between white and a dark background."""
    mask = foreground(video)
    if not mask.any():
        return None
    background = background_colour(video)
    pixels = video[mask].astype(np.float64) - background

    def residual(name: str) -> float:
        towards = np.asarray(COLOURS[name], dtype=np.float64) - background
        coverage = np.clip(pixels @ towards / max(float(towards @ towards), 1e-9), 0.0, 1.0)
        return float(np.linalg.norm(pixels - coverage[:, None] * towards, axis=1).sum())

    return min(COLOURS, key=residual)


def _circular_centre(mask: np.ndarray, axis: int) -> float | None:
    """Centroid of a frame's foreground along `axis` on the torus (a circular mean), in pixels."""
    weights = mask.sum(axis=1 - axis)
    if weights.sum() == 0:
        return None
    n = mask.shape[axis]
    angles = 2 * np.pi * (np.arange(n) + 0.5) / n
    angle = np.arctan2((weights * np.sin(angles)).sum(), (weights * np.cos(angles)).sum())
    return (angle % (2 * np.pi)) * n / (2 * np.pi)


def velocity_of(video: np.ndarray) -> tuple[float, float] | None:
    """Mean foreground displacement per frame (x, y) in pixels, unwrapped across the edges."""
    mask = foreground(video)
    steps: list[tuple[float, float]] = []
    prev = None
    for frame in mask:
        cx, cy = _circular_centre(frame, 1), _circular_centre(frame, 0)
        if cx is None or cy is None:
            prev = None
            continue
        if prev is not None:
            h, w = frame.shape
            steps.append((((cx - prev[0] + w / 2) % w) - w / 2, ((cy - prev[1] + h / 2) % h) - h / 2))
        prev = (cx, cy)
    if not steps:
        return None
    return float(np.mean([s[0] for s in steps])), float(np.mean([s[1] for s in steps]))


def direction_of(video: np.ndarray, still_below: float = 0.2) -> str | None:
    """left / right / up / down by the dominant axis of the mean velocity, static below `still_below`
    pixels per frame at 32 px (scaled to the frame width); None without a visible shape."""
    velocity = velocity_of(video)
    if velocity is None:
        return None
    vx, vy = velocity
    if max(abs(vx), abs(vy)) < still_below * video.shape[2] / 32:
        return "static"
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def initial_frame_similarity(video: np.ndarray, head: int = 3, tail: int | None = None) -> float:
    """How much the last `tail` frames (default: the last quarter) look like the first `head` frames:
    1 - mean |late - nearest early| / 255, averaged over late frames. Near 1 means the video keeps
    copying its start (the failure the EMA sink is meant to avoid); moving content scores lower."""
    frames = video.astype(np.float64)
    tail = tail or max(1, len(frames) // 4)
    early, late = frames[:head], frames[-tail:]
    diffs = np.abs(late[:, None] - early[None]).mean(axis=(2, 3, 4)) / 255  # [tail, head]
    return float(1 - diffs.min(axis=1).mean())
