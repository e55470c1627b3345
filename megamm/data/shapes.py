"""Synthetic shape scenes for visual question answering: scene -> image, caption and questions.

A scene is one to four flat shapes on a plain dark background. The image is split into a 2x2 grid and
each shape lives inside its own grid cell (with a one-pixel margin), so shapes never touch or overlap
and every shape has a well-defined region name ("top-left", ...). The 2x2 grid (rather than 3x3 or
finer positions) is chosen for the small ViTs this data set is meant for: at 32 px with 8 px patches a
cell is 2x2 patches, at 64 px 4x4 patches, and a large shape still fits in its cell. An image may be
rectangular (width x height, for towers that take each image at its own size): its cells are then
rectangles and a shape's size is a fraction of the cell's shorter side, so a circle stays round.

The three steps are separate so that a test (or an evaluation) can check each against the others:

* `sample_scene` - the scene: per shape its kind, color, size, region and exact geometry, drawn from a
  numpy `Generator` (so the same seed gives the same scene on every platform numpy supports).
* `render` - the RGB image. Shapes are drawn at `SUPERSAMPLE` times the size and box-downsampled, which
  antialiases the edges while pixels fully inside a shape keep its exact palette color.
* `caption` / `QuestionGenerator` - text derived from the scene alone.

Questions are asked only when their answer is well defined: a shape is referred to by its kind ("the
circle") only if no other shape has that kind, and by its color ("the red shape") only if no other
shape has that color. Every answer is a single word or number, so exact match scores it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

KINDS = ("circle", "square", "triangle", "cross")
# No palette color is a blend of another with the background, so a pixel with exactly a palette color
# belongs to the interior of a shape of that color (antialiased edges are blends with the background).
COLORS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 200),
    "orange": (250, 140, 20),
}
SIZES = ("small", "large")
REGIONS = ("top-left", "top-right", "bottom-left", "bottom-right")  # cell index = 2 * row + column
BACKGROUND: RGB = (24, 24, 24)
SUPERSAMPLE = 4
MAX_SHAPES = len(REGIONS)
MIN_IMAGE_SIZE = 32  # below this a small shape is under 7 px across and no longer recognizable
# Half the side of a shape's bounding square, as a fraction of the cell side.
RADIUS_FRACTION = {"small": 0.22, "large": 0.36}
MARGIN = 1.0  # pixels kept free between a shape's bounding square and its cell's border
QUESTION_TYPES = ("color", "shape", "count", "exist", "position", "size")
# The answers each question type can have (exist: yes/no; count: 1..max shapes, filled in by callers).
ANSWER_SETS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": KINDS,
    "exist": ("yes", "no"),
    "position": REGIONS,
    "size": SIZES,
}


@dataclass(frozen=True)
class Shape:
    """One shape. `center` is (x, y) in output pixels (multiples of 1/SUPERSAMPLE); `radius` is half
    the side of its bounding square, which lies inside the cell of `region`."""

    kind: str
    color: str
    size: str
    region: str
    center: tuple[float, float]
    radius: float


@dataclass(frozen=True)
class Scene:
    """The shapes of one image (in region order) and the image's width and height in pixels."""

    width: int
    height: int
    shapes: tuple[Shape, ...]

    def to_json(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "shapes": [asdict(s) for s in self.shapes]}


@dataclass(frozen=True)
class Question:
    """One question about a scene: its type (one of QUESTION_TYPES), text and single-word answer."""

    kind: str
    text: str
    answer: str


def image_dimensions(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a square side or a (width, height) pair; ValueError if a side is below
    MIN_IMAGE_SIZE."""
    width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    if min(width, height) < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image size {width}x{height} is too small: shapes would not be recognizable below "
            f"{MIN_IMAGE_SIZE} px a side"
        )
    return width, height


def cell_bounds(region: str, width: int, height: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a region's grid cell in a width x height image, in output pixels."""
    row, column = divmod(REGIONS.index(region), 2)
    cell_w, cell_h = width / 2, height / 2
    return column * cell_w, row * cell_h, (column + 1) * cell_w, (row + 1) * cell_h


def sample_scene(rng: np.random.Generator, image_size: int | tuple[int, int], max_shapes: int) -> Scene:
    """A scene of 1..max_shapes shapes (count uniform), in distinct cells, with kind, color and size
    drawn uniformly and independently, and the center jittered uniformly wherever the shape fits.
    image_size: the side of a square image, or (width, height)."""
    width, height = image_dimensions(image_size)
    if not 1 <= max_shapes <= MAX_SHAPES:
        raise ValueError(f"max_shapes must be between 1 and {MAX_SHAPES}, got {max_shapes}")
    count = int(rng.integers(1, max_shapes + 1))
    cells = sorted(int(c) for c in rng.choice(len(REGIONS), size=count, replace=False))
    cell = min(width, height) / 2  # shapes scale with the cell's shorter side
    shapes = []
    for index in cells:
        region = REGIONS[index]
        kind = KINDS[int(rng.integers(len(KINDS)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        # Geometry on the supersampled grid, so that the rendered image is exactly the recorded shape.
        radius_sub = round(RADIUS_FRACTION[size] * cell * SUPERSAMPLE)
        x0, y0, x1, y1 = (v * SUPERSAMPLE for v in cell_bounds(region, width, height))
        margin = MARGIN * SUPERSAMPLE
        cx = int(rng.integers(math.ceil(x0 + margin + radius_sub), math.floor(x1 - margin - radius_sub) + 1))
        cy = int(rng.integers(math.ceil(y0 + margin + radius_sub), math.floor(y1 - margin - radius_sub) + 1))
        shapes.append(
            Shape(
                kind=kind,
                color=color,
                size=size,
                region=region,
                center=(cx / SUPERSAMPLE, cy / SUPERSAMPLE),
                radius=radius_sub / SUPERSAMPLE,
            )
        )
    return Scene(width=width, height=height, shapes=tuple(shapes))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    """Draw one shape on the supersampled canvas. All shapes span their bounding square (the square a
    little less, so that its area is close to the circle's) and cover their center pixel."""
    x, y = (round(v * SUPERSAMPLE) for v in shape.center)
    r = round(shape.radius * SUPERSAMPLE)
    fill = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse((x - r, y - r, x + r - 1, y + r - 1), fill=fill)
    elif shape.kind == "square":
        s = round(0.85 * r)
        draw.rectangle((x - s, y - s, x + s - 1, y + s - 1), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon(((x, y - r), (x + r - 1, y + r - 1), (x - r, y + r - 1)), fill=fill)
    elif shape.kind == "cross":
        w = round(0.33 * r)
        draw.rectangle((x - w, y - r, x + w - 1, y + r - 1), fill=fill)
        draw.rectangle((x - r, y - w, x + r - 1, y + w - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}; known: {', '.join(KINDS)}")


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of scene.width x scene.height pixels."""
    canvas = Image.new("RGB", (scene.width * SUPERSAMPLE, scene.height * SUPERSAMPLE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for shape in scene.shapes:
        _draw_shape(draw, shape)
    return canvas.reduce(SUPERSAMPLE)  # box filter: interior pixels keep the exact fill color


def caption(scene: Scene) -> str:
    """E.g. "a small red circle at the top-left and a large blue cross at the bottom-right." """
    parts = [f"a {s.size} {s.color} {s.kind} at the {s.region}" for s in scene.shapes]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def _unique(scene: Scene, attribute: str) -> list[Shape]:
    """The shapes whose `attribute` ("kind" or "color") no other shape of the scene shares."""
    counts = Counter(getattr(s, attribute) for s in scene.shapes)
    return [s for s in scene.shapes if counts[getattr(s, attribute)] == 1]


def _referents(scene: Scene) -> list[tuple[str, Shape]]:
    """Unambiguous noun phrases for shapes: "the circle" if the kind is unique, "the red shape" if the
    color is unique (a shape may have both)."""
    phrases = [(f"the {s.kind}", s) for s in _unique(scene, "kind")]
    return phrases + [(f"the {s.color} shape", s) for s in _unique(scene, "color")]


class QuestionGenerator:
    """Questions about scenes, with balanced yes/no answers over all the scenes it is asked about.

    For each scene, `questions_per_image` question types are drawn without replacement from all
    QUESTION_TYPES, and a type the scene cannot answer unambiguously (say "what color is the circle?"
    with two circles) is dropped rather than replaced by another type. Replacing it would make the
    choice of question depend on the scene (three-shape scenes would get more count questions, say)
    and skew the answer distributions that a text-only model could exploit.

    The existence questions come in two forms ("is there a <kind>?", "is there a <color> shape?"); for
    each form the generator asks for the answer ("yes" or "no") given less often so far (ties broken at
    random), so yes and no stay within one of each other per form. If a scene cannot give that answer in
    the chosen form (all four kinds present, no "no" possible), the other form is used.
    """

    def __init__(self, questions_per_image: int) -> None:
        if not 1 <= questions_per_image <= len(QUESTION_TYPES):
            raise ValueError(
                f"questions_per_image must be between 1 and {len(QUESTION_TYPES)} (the number of "
                f"question types), got {questions_per_image}"
            )
        self.questions_per_image = questions_per_image
        self._exist_counts = {form: {"yes": 0, "no": 0} for form in ("kind", "color")}

    def questions(self, scene: Scene, rng: np.random.Generator) -> list[Question]:
        order = rng.permutation(len(QUESTION_TYPES))[: self.questions_per_image]
        asked = (self._ask(QUESTION_TYPES[int(t)], scene, rng) for t in order)
        return [q for q in asked if q is not None]

    def _ask(self, kind: str, scene: Scene, rng: np.random.Generator) -> Question | None:
        if kind == "count":
            return Question(kind, "How many shapes are there?", str(len(scene.shapes)))
        if kind == "exist":
            return self._exist(scene, rng)
        if kind == "color":  # about a shape whose kind is unique in the scene
            unique = _unique(scene, "kind")
            if not unique:
                return None
            s = unique[int(rng.integers(len(unique)))]
            return Question(kind, f"What color is the {s.kind}?", s.color)
        if kind == "shape":  # about a shape whose color is unique in the scene
            unique = _unique(scene, "color")
            if not unique:
                return None
            s = unique[int(rng.integers(len(unique)))]
            return Question(kind, f"Which shape is {s.color}?", s.kind)
        referents = _referents(scene)  # position and size
        if not referents:
            return None
        phrase, s = referents[int(rng.integers(len(referents)))]
        if kind == "position":
            return Question(kind, f"Where is {phrase}?", s.region)
        return Question(kind, f"What size is {phrase}?", s.size)

    def _exist(self, scene: Scene, rng: np.random.Generator) -> Question:
        forms = ["kind", "color"] if rng.integers(2) == 0 else ["color", "kind"]
        for form in forms:
            counts = self._exist_counts[form]
            if counts["yes"] != counts["no"]:
                want = "yes" if counts["yes"] < counts["no"] else "no"
            else:
                want = "yes" if rng.integers(2) == 0 else "no"
            universe = KINDS if form == "kind" else tuple(COLORS)
            present = {getattr(s, form) for s in scene.shapes}
            choices = [v for v in universe if (v in present) == (want == "yes")]
            if choices:
                counts[want] += 1
                value = choices[int(rng.integers(len(choices)))]
                text = f"Is there a {value}?" if form == "kind" else f"Is there a {value} shape?"
                return Question("exist", text, want)
        raise AssertionError("unreachable: a scene with at most four shapes always leaves a color absent")
