"""A tiny synthetic text-video world for the offline demo, where only time tells some captions apart.

Two kinds of videos, each about one thing that happens over time:

* **motion**: one coloured shape crosses the frame, ``"a red square moves to the left"``;
* **order**: one shape is shown, then another, ``"a red square appears, then a blue circle appears"``.

Playing a video backwards gives another valid video of the same kind ("moves to the right"; "a blue
circle appears, then a red square appears") made of exactly the same set of frames. A model that
encodes each frame on its own and averages the features (CLIP with mean pooling) therefore sees the
same thing for both and cannot tell them apart: it is at chance (1 in 2) on these pairs. A *group*
is such a pair (a video and its reversal); its two videos are each other's hard negatives.

The still images used for pretraining show one shape at one of nine places ("a red square at the top
left"). Motion captions end with the same place words, so the text encoder already tells "left" from
"right" when video fine-tuning starts.

Frames are rendered with numpy as uint8 ``[F, H, W, 3]`` arrays; ``to_model_input`` turns a batch into
CLIP-normalised tensors.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from tempme.data.transforms import CLIP_MEAN, CLIP_STD

COLOURS: dict[str, tuple[int, int, int]] = {"red": (230, 40, 40), "green": (40, 210, 60), "blue": (50, 80, 240)}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
# Unit steps in image coordinates: x grows to the right, y grows downwards.
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Where a motion ends, in the place words of the still-image captions.
DESTINATIONS: dict[str, str] = {"left": "the left", "right": "the right", "up": "the top", "down": "the bottom"}
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up"}
AXES: dict[str, tuple[str, str]] = {"horizontal": ("left", "right"), "vertical": ("up", "down")}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
BACKGROUND = 30  # dark grey, so every colour stands out

Point = tuple[int, int]  # (x, y) pixel centre of a shape
Scene = list[tuple[str, str, Point]]  # (colour, shape, centre) of each shape in one frame


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the synthetic world."""

    image_size: int = 32
    frames: int = 8
    object_radius: int = 4  # half the side of a square; shapes span 2 * radius + 1 pixels
    speed: int = 3  # pixels per frame; 3 x 7 steps carries a shape from one side to the other
    noise: float = 6.0  # std of the per-pixel Gaussian noise (0-255 scale)

    @property
    def travel(self) -> int:
        """Distance a moving shape covers over the video."""
        return self.speed * (self.frames - 1)

    @property
    def low(self) -> int:
        """Smallest centre coordinate that keeps a shape inside the frame."""
        return self.object_radius

    @property
    def high(self) -> int:
        """Largest centre coordinate that keeps a shape inside the frame."""
        return self.image_size - 1 - self.object_radius

    def validate(self) -> None:
        if self.frames < 2 or self.frames % 2:
            raise ValueError(f"frames must be even and at least 2 (order videos show two halves), got {self.frames}")
        if self.travel > self.high - self.low:
            raise ValueError(
                f"shapes would leave the frame: travel {self.travel} px > {self.high - self.low} px of room "
                f"(image {self.image_size}, radius {self.object_radius}, speed {self.speed}, frames {self.frames})"
            )


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str

    def __str__(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class MotionVideo:
    """``thing`` moves from ``start`` in ``direction`` by ``world.speed`` pixels per frame."""

    thing: Thing
    direction: str
    start: Point

    @property
    def caption(self) -> str:
        return f"a {self.thing} moves to {DESTINATIONS[self.direction]}"

    def position(self, frame: int, world: WorldConfig) -> Point:
        dx, dy = DIRECTIONS[self.direction]
        return self.start[0] + dx * world.speed * frame, self.start[1] + dy * world.speed * frame

    def scenes(self, world: WorldConfig) -> list[Scene]:
        return [[(self.thing.colour, self.thing.shape, self.position(f, world))] for f in range(world.frames)]

    def reversed(self, world: WorldConfig) -> "MotionVideo":
        """Played backwards: the shape runs from where it ended back to where it started."""
        return MotionVideo(self.thing, OPPOSITE[self.direction], self.position(world.frames - 1, world))


@dataclass(frozen=True)
class OrderVideo:
    """``first`` is shown (still, at ``first_at``) in the first half of the frames, ``second`` in the rest."""

    first: Thing
    second: Thing
    first_at: Point
    second_at: Point

    @property
    def caption(self) -> str:
        return f"a {self.first} appears, then a {self.second} appears"

    def scenes(self, world: WorldConfig) -> list[Scene]:
        half = world.frames // 2
        shown = [(self.first, self.first_at)] * half + [(self.second, self.second_at)] * half
        return [[(thing.colour, thing.shape, at)] for thing, at in shown]

    def reversed(self, world: WorldConfig) -> "OrderVideo":
        return OrderVideo(self.second, self.first, self.second_at, self.first_at)


Video = MotionVideo | OrderVideo


def shape_mask(shape: str, centre: Point, radius: int, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of a shape centred at ``centre`` = (x, y)."""
    ys, xs = np.mgrid[0:size, 0:size]
    dx, dy = xs - centre[0], ys - centre[1]
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2 + radius  # the + radius rounds the outline out a little
    if shape == "triangle":  # apex up: rows widen from the top to the base
        return (np.abs(dy) <= radius) & (2 * np.abs(dx) <= dy + radius)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def draw(scene: Scene, world: WorldConfig, rng: np.random.Generator | None) -> np.ndarray:
    """One uint8 ``[H, W, 3]`` frame; ``rng`` adds pixel noise, ``None`` draws it clean."""
    size = world.image_size
    frame = np.full((size, size, 3), BACKGROUND, dtype=np.float32)
    for colour, shape, centre in scene:
        frame[shape_mask(shape, centre, world.object_radius, size)] = COLOURS[colour]
    if rng is not None:
        frame += rng.normal(0.0, world.noise, frame.shape).astype(np.float32)
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def render(video: Video, world: WorldConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """The frames of a video: uint8 ``[F, H, W, 3]``. ``rng`` adds pixel noise; ``None`` draws clean frames."""
    return np.stack([draw(scene, world, rng) for scene in video.scenes(world)])


def random_start(direction: str, world: WorldConfig, rng: np.random.Generator) -> Point:
    """A start that keeps the whole path inside the frame.

    Uniform over the valid range, so a path and its reversal are equally likely: the unordered set of
    frames does not give the direction away.
    """

    def coordinate(step: int) -> int:
        if step > 0:
            return int(rng.integers(world.low, world.high - world.travel + 1))
        if step < 0:
            return int(rng.integers(world.low + world.travel, world.high + 1))
        return int(rng.integers(world.low, world.high + 1))

    dx, dy = DIRECTIONS[direction]
    return coordinate(dx), coordinate(dy)


def random_point(world: WorldConfig, rng: np.random.Generator) -> Point:
    return int(rng.integers(world.low, world.high + 1)), int(rng.integers(world.low, world.high + 1))


@dataclass(frozen=True)
class MotionGroup:
    """A shape moving along an axis: its two videos go in opposite directions."""

    thing: Thing
    axis: str

    def make_video(self, variant: int, world: WorldConfig, rng: np.random.Generator) -> MotionVideo:
        direction = AXES[self.axis][variant]
        return MotionVideo(self.thing, direction, random_start(direction, world, rng))


@dataclass(frozen=True)
class OrderGroup:
    """Two shapes of different colours: its two videos show them in opposite orders."""

    things: tuple[Thing, Thing]

    def make_video(self, variant: int, world: WorldConfig, rng: np.random.Generator) -> OrderVideo:
        first, second = self.things if variant == 0 else self.things[::-1]
        return OrderVideo(first, second, random_point(world, rng), random_point(world, rng))


Group = MotionGroup | OrderGroup


def all_groups() -> list[Group]:
    """Every group of the world: 9 shapes x 2 axes = 18 motion groups, 27 colour-distinct pairs = 27 order groups."""
    things = [Thing(colour, shape) for colour, shape in itertools.product(COLOURS, SHAPES)]
    motion = [MotionGroup(thing, axis) for thing in things for axis in AXES]
    order = [OrderGroup((a, b)) for a, b in itertools.combinations(things, 2) if a.colour != b.colour]
    return motion + order


@dataclass
class VideoBatch:
    """Rendered videos: ``frames`` uint8 ``[N, F, H, W, 3]``; ``groups[i]`` indexes ``all_groups()``."""

    frames: np.ndarray
    captions: list[str]
    videos: list[Video]
    groups: list[int]


def sample_videos(world: WorldConfig, rng: np.random.Generator, num_groups: int | None = None) -> VideoBatch:
    """Both videos of ``num_groups`` distinct random groups (all groups, in order, when ``None``).

    A video and its reversal always come together, so every batch holds the hard negatives that only
    time separates; captions are all different, so contrastive training sees no false negative.
    """
    groups = all_groups()
    if num_groups is None:
        chosen = range(len(groups))
    elif 1 <= num_groups <= len(groups):
        chosen = rng.choice(len(groups), size=num_groups, replace=False)
    else:
        raise ValueError(f"num_groups must be between 1 and {len(groups)}, got {num_groups}")
    videos, group_ids = [], []
    for group_id in chosen:
        for variant in (0, 1):
            videos.append(groups[group_id].make_video(variant, world, rng))
            group_ids.append(int(group_id))
    frames = np.stack([render(video, world, rng) for video in videos])
    return VideoBatch(frames, [video.caption for video in videos], videos, group_ids)


def grid_cell(centre: Point, size: int) -> str:
    """'top left', 'middle centre', ... for a position, from a 3 x 3 grid over the image."""
    column = COLUMNS[min(3 * centre[0] // size, 2)]
    row = ROWS[min(3 * centre[1] // size, 2)]
    return f"{row} {column}"


def cell_positions(cell: int, world: WorldConfig) -> np.ndarray:
    """Centre coordinates along one axis that fall in grid cell ``cell`` (0, 1, 2) and keep the shape inside."""
    positions = np.arange(world.low, world.high + 1)
    return positions[np.minimum(3 * positions // world.image_size, 2) == cell]


def sample_stills(world: WorldConfig, rng: np.random.Generator, count: int) -> tuple[np.ndarray, list[str]]:
    """Still images of one shape for pretraining, captioned with its colour, shape and place.

    ``"a red square at the top left"``: 9 shapes x 9 places = 81 captions, all different within a call
    (``count`` <= 81), so contrastive pretraining sees no false negative. Learning the places makes the
    backbone encode where things are, which telling directions apart needs later.
    Returns uint8 ``[count, 1, H, W, 3]`` (one-frame videos) and the captions.
    """
    choices = list(itertools.product(COLOURS, SHAPES, range(3), range(3)))
    if not 1 <= count <= len(choices):
        raise ValueError(f"count must be between 1 and {len(choices)} distinct still images, got {count}")
    images, captions = [], []
    for index in rng.choice(len(choices), size=count, replace=False):
        colour, shape, row, column = choices[index]
        centre = int(rng.choice(cell_positions(column, world))), int(rng.choice(cell_positions(row, world)))
        images.append(draw([(colour, shape, centre)], world, rng))
        captions.append(f"a {colour} {shape} at the {grid_cell(centre, world.image_size)}")
    return np.stack(images)[:, None], captions


def to_model_input(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, F, H, W, 3]`` -> CLIP-normalised float ``[N, F, 3, H, W]``."""
    pixels = torch.from_numpy(frames).permute(0, 1, 4, 2, 3).float().div(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 1, 3, 1, 1)
    return (pixels - mean) / std
