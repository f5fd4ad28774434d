"""The toy world: deterministic clips with matching prompts, and measures that are exact on its clips."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from toyworld.evaluate import measure_clip
from toyworld.exact import WorldClips
from toyworld.world import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SIZES,
    SPEEDS,
    Scene,
    all_attributes,
    clips,
    colour_of,
    direction_of,
    initial_frame_similarity,
    parse_prompt,
    render,
    velocity_of,
)


def test_clips_are_deterministic_by_seed_and_match_their_prompts():
    a, b = clips(4, seed=10), clips(4, seed=10)
    assert all(sa == sb and np.array_equal(va, vb) for (sa, va), (sb, vb) in zip(a, b))
    assert not np.array_equal(a[0][1], clips(1, seed=11)[0][1])
    scene, video = a[0]
    assert video.shape == (21, 32, 32, 3) and video.dtype == np.uint8
    assert scene.prompt.startswith(f"a {scene.colour} {scene.shape} ") and scene.background in scene.prompt
    still = Scene("square", "red", "gray", "static", "quickly", 0.5, 0.5, 0.15)
    assert still.prompt == "a red square stays still on a gray background"


@pytest.mark.parametrize("size", [32, 64])
def test_colour_and_direction_are_read_back_exactly_for_every_scene_kind(size):
    backgrounds, speeds = itertools.cycle(BACKGROUNDS), itertools.cycle(SPEEDS)  # every one, over the loop
    rng = np.random.default_rng(0)
    for shape, colour, direction in itertools.product(SHAPES, COLOURS, DIRECTIONS):
        background, speed = next(backgrounds), next(speeds)
        x0, y0 = rng.choice([0.02, 0.5, 0.97]), rng.choice([0.03, 0.5, 0.96])  # starts across an edge too
        scene = Scene(shape, colour, background, direction, speed, float(x0), float(y0), float(rng.uniform(0.12, 0.2)))
        video = render(scene, 21, size, size)
        assert colour_of(video) == scene.colour and direction_of(video) == scene.direction, scene
        vx, vy = velocity_of(video)
        ex, ey = scene.velocity(size)
        assert abs(vx - ex) < 0.15 * size / 32 and abs(vy - ey) < 0.15 * size / 32, (scene, vx, vy)


def test_measures_on_videos_outside_the_world():
    blank = np.full((10, 32, 32, 3), 50, dtype=np.uint8)
    assert colour_of(blank) is None and direction_of(blank) is None
    still = render(Scene("circle", "blue", "black", "static", "slowly", 0.5, 0.5, 0.15))
    moving = render(Scene("circle", "blue", "black", "right", "quickly", 0.5, 0.5, 0.15))
    assert initial_frame_similarity(still) == 1.0
    assert initial_frame_similarity(moving) < initial_frame_similarity(still)


def test_a_prompt_leaves_only_the_grid_position_and_a_few_sizes_open():
    for scene, video in clips(200, seed=0, frames=3):
        assert scene.x0 * 32 == int(scene.x0 * 32) and scene.y0 * 32 == int(scene.y0 * 32) and scene.size in SIZES
        assert parse_prompt(scene.prompt).prompt == scene.prompt
    assert len(all_attributes()) == 3 * 6 * 3 * (1 + 4 * 3) and abs(sum(p for _, p in all_attributes()) - 1) < 1e-12
    assert parse_prompt("A  Red circle stays still on a GRAY background").background == "gray"
    for bad in ("a corgi runs on a beach", "a pink circle stays still on a gray background"):
        with pytest.raises(ValueError, match="not a prompt of the toy world.*colours red, green"):
            parse_prompt(bad)


def test_world_tokenizer_gives_one_id_per_word_and_the_shipped_copy_is_current(tmp_path):
    from core.codecs.text_encoder import load_tokenizer
    from core.config import REPO_ROOT
    from toyworld.world import write_tokenizer

    write_tokenizer(tmp_path)
    shipped = REPO_ROOT / "assets" / "toyworld" / "tokenizer"
    assert (tmp_path / "tokenizer.json").read_text() == (shipped / "tokenizer.json").read_text(), \
        "assets/toyworld/tokenizer is stale: rewrite it with toyworld.world.write_tokenizer"
    tokenizer = load_tokenizer(shipped)
    unk = tokenizer.convert_tokens_to_ids("<unk>")
    prompts = [Scene.from_seed(i).prompt for i in range(200)]
    batch = tokenizer(prompts, max_length=16, padding="max_length", truncation=True, return_tensors="pt")
    for prompt, ids, mask in zip(prompts, batch["input_ids"], batch["attention_mask"]):
        words = prompt.split()
        assert int(mask.sum()) == len(words) + 1 and int(ids[len(words)]) == tokenizer.eos_token_id
        assert unk not in ids.tolist() and tokenizer.convert_ids_to_tokens(ids[:len(words)].tolist()) == words
    red, blue = tokenizer(["a red circle", "a blue circle"])["input_ids"]
    assert red[0] == blue[0] and red[2:] == blue[2:] and red[1] != blue[1]  # a colour word changes one id only
    assert tokenizer(["A RED cat"])["input_ids"][0][:3] == [red[0], red[1], unk]


def test_colour_as_drawn_reads_a_dim_shape_by_its_hue_and_fails_a_shape_that_changes_or_vanishes():
    """The nearest world clip (RMS) reads a half-covered white square on black as purple, which lies between them;
    the colour as drawn reads white. It still fails a shape that turns red after the first block or vanishes."""
    scene = Scene("square", "white", "black", "right", "steadily", 0.5, 0.5, SIZES[1])
    white, red = render(scene, 9), render(dataclasses.replace(scene, colour="red"), 9)
    background = np.array(BACKGROUNDS["black"], dtype=np.float64)
    dim = (background + 0.5 * (white - background)).round().astype(np.uint8)
    prompt, clips = scene.prompt, WorldClips(9, 32, 32)
    measured = measure_clip(dim, prompt, clips, 3)
    assert measured["adherence_colour"] == 0.0 and measured["drawn_colour"] == 1.0, measured
    assert measure_clip(white, prompt, clips, 3)["drawn_colour"] == 1.0
    turns_red = np.concatenate([white[:3], red[3:]])
    vanishes = np.concatenate([white[:3], np.broadcast_to(white[:1, :1, :1], white[3:].shape)])
    assert measure_clip(turns_red, prompt, clips, 3)["drawn_colour"] == 0.0
    assert measure_clip(vanishes, prompt, clips, 3)["drawn_colour"] == 0.0


def test_boundary_steps_split_the_first_boundary_from_the_later_ones():
    """A clip whose first block is drawn elsewhere jumps at the first boundary only: the first boundary's step is
    larger than a within-block one, the later boundaries' equal to one (the world's motion)."""
    scene = Scene("square", "white", "black", "right", "steadily", 0.5, 0.5, SIZES[1])
    world = render(scene, 9)
    moved = np.concatenate([np.roll(world[:3], 8, axis=1), world[3:]])  # block 1 drawn 8 rows lower
    clips = WorldClips(9, 32, 32)
    measured, as_world = measure_clip(moved, scene.prompt, clips, 3), measure_clip(world, scene.prompt, clips, 3)
    assert measured["first_boundary_step"] > 2 * measured["within_step"]
    assert measured["later_boundary_step"] == pytest.approx(measured["within_step"])
    assert as_world["first_boundary_step"] == pytest.approx(as_world["within_step"])
