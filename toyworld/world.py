"""A toy video world small enough to learn on a laptop, and measures that are exact in it.

Clips show one flat-coloured shape (circle, square or triangle) on a flat background, moving
left, right, up or down at one of three speeds, or staying still; the scene wraps around the
frame edges, so motion never stops. Each clip has the prompt that describes it ("a red circle
moves quickly left across a gray background"). Everything is deterministic by seed and
rendered with hard edges, so the colour and the motion of a clip can be read back exactly:
`colour_of` and `direction_of` recover the scene's colour and direction from pixels alone
(tested on every scene kind), which makes prompt adherence measurable without a learned model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 70), "blue": (40, 90, 235),
    "yellow": (240, 220, 40), "purple": (165, 60, 205), "white": (245, 245, 245)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (16, 16, 16), "gray": (120, 120, 120), "brown": (105, 70, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "static": (0, 0)}
SPEEDS: dict[str, float] = {"slowly": 0.5, "steadily": 1.0, "quickly": 1.5}  # pixels per frame at 32 px


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
    def sample(cls, rng: np.random.Generator, static_fraction: float = 0.2) -> "Scene":
        moving = [d for d in DIRECTIONS if d != "static"]
        direction = "static" if rng.random() < static_fraction else moving[rng.integers(len(moving))]
        return cls(shape=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
                   background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], direction=direction,
                   speed=list(SPEEDS)[rng.integers(len(SPEEDS))], x0=float(rng.uniform(0, 1)),
                   y0=float(rng.uniform(0, 1)), size=float(rng.uniform(0.12, 0.2)))

    @classmethod
    def from_seed(cls, seed: int) -> "Scene":
        return cls.sample(np.random.default_rng(seed))

    def velocity(self, width: int) -> tuple[float, float]:
        """Pixels per frame (x, y) at this frame width."""
        dx, dy = DIRECTIONS[self.direction]
        v = SPEEDS[self.speed] * width / 32
        return dx * v, dy * v


def _inside(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Pixel centres (u, v relative to the shape's centre) covered by the shape of half-extent r."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return (np.abs(u) <= r) & (np.abs(v) <= r)
    return (v <= r) & (v >= -r) & (np.abs(u) <= (v + r) / 2)  # triangle pointing up


def render(scene: Scene, frames: int = 21, height: int = 32, width: int = 32) -> np.ndarray:
    """uint8 [frames, height, width, 3] of `scene`, wrapping around the edges."""
    vx, vy = scene.velocity(width)
    r = scene.size * min(height, width)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    video[:] = BACKGROUNDS[scene.background]
    for t in range(frames):
        cx, cy = (scene.x0 * width + vx * t) % width, (scene.y0 * height + vy * t) % height
        u = (xs - cx + width / 2) % width - width / 2  # torus: the nearest copy of the centre
        v = (ys - cy + height / 2) % height - height / 2
        video[t][_inside(scene.shape, u, v, r)] = COLOURS[scene.colour]
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
    """The palette name nearest to the median foreground colour; None when there is no foreground."""
    mask = foreground(video)
    if not mask.any():
        return None
    median = np.median(video[mask].astype(np.float64), axis=0)
    return min(COLOURS, key=lambda name: float(np.linalg.norm(median - np.array(COLOURS[name]))))


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


def prompt_adherence(video: np.ndarray, scene: Scene) -> dict[str, bool]:
    """Whether the video shows the scene's colour and direction (exact classifiers of this world)."""
    return {"colour": colour_of(video) == scene.colour, "direction": direction_of(video) == scene.direction}


def initial_frame_similarity(video: np.ndarray, head: int = 3, tail: int | None = None) -> float:
    """How much the last `tail` frames (default: the last quarter) look like the first `head` frames:
    1 - mean |late - nearest early| / 255, averaged over late frames. Near 1 means the video keeps
    copying its start (the failure the EMA sink is meant to avoid); moving content scores lower."""
    frames = video.astype(np.float64)
    tail = tail or max(1, len(frames) // 4)
    early, late = frames[:head], frames[-tail:]
    diffs = np.abs(late[:, None] - early[None]).mean(axis=(2, 3, 4)) / 255  # [tail, head]
    return float(1 - diffs.min(axis=1).mean())


def clip_features(video: np.ndarray) -> np.ndarray:
    """Simple per-clip features: foreground fraction, median foreground RGB / 255, speed, background RGB / 255."""
    mask = foreground(video)
    fg = np.median(video[mask].astype(np.float64), axis=0) / 255 if mask.any() else np.zeros(3)
    velocity = velocity_of(video) or (0.0, 0.0)
    speed = float(np.hypot(*velocity)) * 32 / video.shape[2]
    return np.array([mask.mean(), *fg, speed, *(background_colour(video) / 255)])


def feature_distance(videos_a: list[np.ndarray], videos_b: list[np.ndarray]) -> float:
    """Fréchet distance between diagonal Gaussians fitted to the clip features of two sets (0: same statistics)."""
    fa = np.stack([clip_features(v) for v in videos_a])
    fb = np.stack([clip_features(v) for v in videos_b])
    return float(((fa.mean(0) - fb.mean(0)) ** 2).sum() + ((fa.std(0) - fb.std(0)) ** 2).sum())
