"""Procedurally drawn image-caption pairs: the offline default dataset.

Each image holds 1-4 objects (shape x colour x size x grid cell) on a background colour and
texture; its caption describes exactly what is drawn, in varied wording (templates, synonyms,
spatial relations such as "left of" / "above"). Every object is named as ``[size] colour shape``
with the colour word directly before the shape word, so a caption binds colours to shapes: a red
circle and a blue square is not a blue circle and a red square.

Determinism: sample ``i`` of split ``s`` is drawn from its own ``random.Random`` seeded with
``(seed, s, i)``, so a dataset is a pure function of its arguments and the held-out split comes
from a different seed stream than the train split.

Output (docs/ARCHITECTURE.md): ``DIR/train-NNNNNN.tar`` (1 caption per image),
``DIR/val-NNNNNN.tar`` (2 differently worded captions per image, two samples sharing
``image_id``), ``DIR/manifest.json`` and ``DIR/tokenizer/`` trained on the train captions; with
``num_classify`` also ``DIR/classify/`` (one object per image, labelled by shape and colour, for
zero-shot classification; its own manifest and seed stream, see ``write_classify_split``).

Sample json: ``image_id``, ``source``, ``width``, ``height``, ``caption_index``, the scene
(``background``, ``texture``, ``objects``: shape, colour, size, grid ``row``/``col``, position
name, centre, radius) and ``caption_plan`` (``CaptionPlan.to_json()``: the template, the words
of each object mention in the order named, the stated relation). ``render_caption`` of the plan
is the sample's caption; the compositional test (mmpretrain.evaluation.compositional) renders it
again with one thing changed.
"""

from __future__ import annotations

import io
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from mmpretrain.data.shardwriter import (
    ShardsError,
    TarShard,
    new_manifest,
    progress_bar,
    read_manifest,
    remove_stale_shards,
    sample_fields,
    shard_name,
    write_manifest,
)

# name -> words used in captions (the first is the canonical one)
SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
    "ring": ("ring", "hoop"),
    "hexagon": ("hexagon",),
}
# name -> (RGB, words)
COLORS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "red": ((220, 30, 30), ("red", "crimson")),
    "green": ((40, 170, 60), ("green",)),
    "blue": ((35, 75, 225), ("blue",)),
    "yellow": ((245, 220, 40), ("yellow",)),
    "orange": ((245, 140, 25), ("orange",)),
    "purple": ((140, 50, 185), ("purple", "violet")),
    "pink": ((250, 135, 195), ("pink",)),
    "cyan": ((40, 215, 225), ("cyan", "turquoise")),
    "brown": ((125, 80, 35), ("brown",)),
    "white": ((248, 248, 248), ("white",)),
}
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "black": ((12, 12, 12), ("black",)),
    "dark gray": ((70, 70, 75), ("dark gray", "dark grey")),
    "light gray": ((195, 195, 195), ("light gray", "light grey")),
    "beige": ((225, 210, 175), ("beige", "tan")),
    "navy": ((20, 30, 80), ("navy", "dark blue")),
}
TEXTURES: dict[str, tuple[str, ...]] = {
    "plain": ("plain",),
    "striped": ("striped",),
    "dotted": ("dotted", "spotted"),
    "checkered": ("checkered", "checked"),
}
# name -> (diameter as a fraction of the grid cell, words)
SIZES: dict[str, tuple[float, tuple[str, ...]]] = {
    "small": (0.5, ("small", "little", "tiny")),
    "medium": (0.72, ("medium", "mid-size")),
    "large": (0.95, ("large", "big")),
}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
RELATIONS = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
MIN_CONTRAST = 110.0  # RGB distance below which an object colour is not used on a background
JPEG_QUALITY = 90
SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges at 64 px
MAX_CAPTION_TOKENS = 32  # = the default data.max_length: captions are never truncated by it
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")  # BERT pre-tokenization: words and punctuation


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    col: int
    cx: float  # centre, output pixels
    cy: float
    radius: float  # output pixels

    @property
    def position(self) -> str:
        if self.row == 1 and self.col == 1:
            return "center"
        if self.row == 1:
            return COLS[self.col]
        if self.col == 1:
            return ROWS[self.row]
        return f"{ROWS[self.row]} {COLS[self.col]}"

    def to_json(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "position": self.position,
            "row": self.row,
            "col": self.col,
            "center": [round(self.cx, 2), round(self.cy, 2)],
            "radius": round(self.radius, 2),
        }


@dataclass
class Scene:
    background: str
    texture: str
    texture_angle: int  # 0: horizontal stripes, 1: vertical (drawing detail, not captioned)
    objects: list[SceneObject]


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    # str seeds are hashed with SHA-512 by `random`: stable across processes and Python runs
    return random.Random(f"mmpretrain-synthetic/{seed}/{split}/{index}")


def _distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


def sample_scene(rng: random.Random, image_size: int) -> Scene:
    background = rng.choice(list(BACKGROUNDS))
    bg_rgb = BACKGROUNDS[background][0]
    colors = [c for c, (rgb, _) in COLORS.items() if _distance(rgb, bg_rgb) >= MIN_CONTRAST]
    num_objects = rng.choices((1, 2, 3, 4), weights=(3, 3, 2, 2))[0]
    cells = rng.sample(range(9), num_objects)
    cell = image_size / 3.0
    used: set[tuple[str, str]] = set()
    objects = []
    for c in cells:
        while True:  # distinct (colour, shape) pairs: every object is named once, unambiguously
            pair = (rng.choice(colors), rng.choice(list(SHAPES)))
            if pair not in used:
                used.add(pair)
                break
        size = rng.choice(list(SIZES))
        radius = SIZES[size][0] * cell / 2.0
        slack = cell / 2.0 - radius  # jitter inside the cell, never crossing into a neighbour
        row, col = divmod(c, 3)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        objects.append(SceneObject(pair[1], pair[0], size, row, col, cx, cy, radius))
    return Scene(background, rng.choice(list(TEXTURES)), rng.randrange(2), objects)


# ---------------------------------------------------------------------------------- drawing
def _shade(rgb: tuple[int, int, int], delta: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + delta)) for v in rgb)  # type: ignore[return-value]


def _regular_polygon(cx, cy, r, n, rotation=-math.pi / 2):
    angles = [rotation + 2 * math.pi * k / n for k in range(n)]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]


def _draw_texture(draw: ImageDraw.ImageDraw, size: int, scene: Scene) -> None:
    base = BACKGROUNDS[scene.background][0]
    accent = _shade(base, 30 if sum(base) < 300 else -30)
    period = max(4, size // 8)
    if scene.texture == "striped":
        for p in range(0, size, period):
            box = [0, p, size, p + period // 2 - 1] if scene.texture_angle == 0 else [p, 0, p + period // 2 - 1, size]
            draw.rectangle(box, fill=accent)
    elif scene.texture == "dotted":
        r = max(1, period // 5)
        for y in range(period // 2, size, period):
            for x in range(period // 2, size, period):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=accent)
    elif scene.texture == "checkered":
        for y in range(0, size, period):
            for x in range((y // period) % 2 * period, size, 2 * period):
                draw.rectangle([x, y, x + period - 1, y + period - 1], fill=accent)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, scale: float) -> None:
    fill = COLORS[obj.color][0]
    cx, cy, r = obj.cx * scale, obj.cy * scale, obj.radius * scale
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + r * 0.15, r, 3), fill=fill)
    elif obj.shape == "star":
        points = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + math.pi * k / 5
            points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(points, fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=fill)
    elif obj.shape == "cross":
        t = r * 0.35
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif obj.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, round(r * 0.4)))
    elif obj.shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, rotation=0.0), fill=fill)
    else:  # pragma: no cover - SHAPES and this function are kept in sync
        raise ValueError(f"unknown shape {obj.shape!r}")


def draw_scene(scene: Scene, image_size: int) -> Image.Image:
    big = image_size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background][0])
    draw = ImageDraw.Draw(image)
    _draw_texture(draw, big, scene)
    for obj in scene.objects:
        _draw_object(draw, obj, SUPERSAMPLE)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: small saturated shapes keep their colour at 64 px
    image.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


# ---------------------------------------------------------------------------------- captions
# A caption is composed as a *plan* (see ``CaptionPlan``): a template whose object mentions are
# placeholders ``{0}``, ``{1}``, ... (in the order they are named) and whose relation words are
# ``{r}``, plus the words chosen for each mention. ``render_caption(plan)`` turns a plan into
# the caption text; ``make_caption`` returns exactly that text. The plan is stored in each
# sample's json, so evaluation can re-render a caption with one thing changed (a colour, a
# shape, a size word, the relation) and nothing else (mmpretrain.evaluation.compositional).
_SLOT_RE = re.compile(r"\{(\d+|r)\}")


@dataclass
class Mention:
    """One object as the caption names it: ``[size] colour shape`` (the words used)."""
    object: int  # index into Scene.objects (the sample json's "objects")
    size: str | None  # the size word, or None when the caption does not name the size
    color: str
    shape: str
    position: bool = False  # a position phrase for this object follows the mention

    def phrase(self) -> str:
        words = ([self.size] if self.size else []) + [self.color, self.shape]
        return _article(" ".join(words))


@dataclass
class CaptionPlan:
    """What a caption was made from: ``render_caption(plan)`` is the caption.

    ``template``: the caption before finishing (capital letter, final full stop), with
    ``{k}`` for mention ``k`` and ``{r}`` for the relation words. ``relation``: the caption
    says "mention ``subject`` <``words``> mention ``object``", ``relation`` being a key of
    RELATIONS (``left``/``right``/``above``/``below``), or None when it states no relation.
    """
    template: str = ""
    mentions: list[Mention] = field(default_factory=list)
    relation: dict | None = None

    def to_json(self) -> dict:
        return {"template": self.template, "mentions": [asdict(m) for m in self.mentions],
                "relation": dict(self.relation) if self.relation else None}

    @classmethod
    def from_json(cls, d: dict) -> "CaptionPlan":
        return cls(str(d["template"]), [Mention(**m) for m in d["mentions"]],
                   dict(d["relation"]) if d.get("relation") else None)


def render_caption(plan: CaptionPlan) -> str:
    """The caption text of ``plan`` (the generator's own finishing: single spaces, capital
    first letter, full stop)."""
    def slot(m: re.Match) -> str:
        name = m.group(1)
        return str(plan.relation["words"]) if name == "r" else plan.mentions[int(name)].phrase()

    text = " ".join(_SLOT_RE.sub(slot, plan.template).split())
    return text[0].upper() + text[1:] + "."


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _index(scene: Scene, obj: SceneObject) -> int:
    return next(i for i, o in enumerate(scene.objects) if o is obj)


def _object_phrase(obj: SceneObject, rng: random.Random, plan: CaptionPlan, scene: Scene) -> str:
    """A placeholder for a new mention of ``obj`` (random words drawn as always)."""
    size = rng.choice(SIZES[obj.size][1]) if rng.random() < 0.6 else None
    color = rng.choice(COLORS[obj.color][1])  # colour directly before the shape word
    shape = rng.choice(SHAPES[obj.shape])
    plan.mentions.append(Mention(_index(scene, obj), size, color, shape))
    return "{%d}" % (len(plan.mentions) - 1)


def _position_phrase(obj: SceneObject, rng: random.Random, plan: CaptionPlan | None = None) -> str:
    """Where ``obj`` is; marks the plan's last mention (``obj``'s) as followed by it."""
    if plan is not None:
        plan.mentions[-1].position = True
    row, col = ROWS[obj.row], COLS[obj.col]
    if obj.row == 1 and obj.col == 1:
        return rng.choice(("in the center", "in the middle", "at the center of the image"))
    if obj.row == 1:
        return rng.choice((f"on the {col}", f"on the {col} side", f"at the {col} edge"))
    if obj.col == 1:
        return rng.choice((f"at the {row}", f"at the {row} of the image", f"along the {row} edge"))
    return rng.choice((f"in the {row} {col} corner", f"at the {row} {col}", f"in the {row}-{col} corner"))


def _background_phrase(scene: Scene, rng: random.Random) -> str:
    color = rng.choice(BACKGROUNDS[scene.background][1])
    if scene.texture == "plain" and rng.random() < 0.6:
        return f"{color} background"
    return f"{rng.choice(TEXTURES[scene.texture])} {color} background"


def relation_holds(relation: str, a_row: int, a_col: int, b_row: int, b_col: int) -> bool:
    """Whether "a <relation> b" is true for objects in grid cells (row, col)."""
    return {"left": a_col < b_col, "right": a_col > b_col,
            "above": a_row < b_row, "below": a_row > b_row}[relation]


def _relation(a: SceneObject, b: SceneObject, rng: random.Random, plan: CaptionPlan) -> str:
    """A spatial relation that holds for "a <relation> b" (the plan's last two mentions)."""
    options = [r for r in RELATIONS if relation_holds(r, a.row, a.col, b.row, b.col)]
    key = rng.choice(options)
    n = len(plan.mentions)
    plan.relation = {"subject": n - 1, "object": n, "relation": key, "words": rng.choice(RELATIONS[key])}
    return "{r}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def count_tokens(caption: str) -> int:
    """Tokens of ``caption`` under a BERT-style WordPiece tokenizer trained on these captions
    (every caption word is in its vocabulary), [CLS] and [SEP] included."""
    return len(_TOKEN_RE.findall(caption)) + 2


def _compose(scene: Scene, rng: random.Random) -> CaptionPlan:
    plan = CaptionPlan()
    objs = list(scene.objects)
    rng.shuffle(objs)  # mention order carries no information
    bg = _background_phrase(scene, rng)
    n = len(objs)

    def obj(o):
        return _object_phrase(o, rng, plan, scene)

    def obj_pos(o):
        return f"{obj(o)} {_position_phrase(o, rng, plan)}"

    if n == 1:
        ob = obj(objs[0])
        pos = _position_phrase(objs[0], rng, plan)
        plan.template = rng.choice(
            (
                f"{ob} {pos} on a {bg}",
                f"{_article(bg)} with {ob} {pos}",
                f"{pos}, {ob} on a {bg}",
                f"an image of {ob} {pos} against a {bg}",
                f"there is {ob} {pos} of a {bg}".replace(" of the image of", " of"),
                f"{ob} {pos}, set against a {bg}",
            )
        )
        return plan
    template = rng.randrange(4)
    if template == 0:  # every object with its position
        with_pos = _join([obj_pos(o) for o in objs])
        plan.template = rng.choice((f"{with_pos} on a {bg}", f"{_article(bg)} with {with_pos}"))
        return plan
    if template == 1:  # a count and the objects, no positions
        things = rng.choice(("shapes", "objects"))
        names = _join([obj(o) for o in objs])
        plan.template = rng.choice(
            (
                f"{COUNT_WORDS[n]} {things} on a {bg}: {names}",
                f"{names} on a {bg}",
                f"{_article(bg)} showing {COUNT_WORDS[n]} {things}, {names}",
            )
        )
        return plan
    # a spatial relation between two objects, the rest by position (or just named)
    a, b = objs[0], objs[1]
    first = obj(a)
    rel = f"{first} {_relation(a, b, rng, plan)} {obj(b)}"
    if n == 2:
        plan.template = rng.choice((f"{rel} on a {bg}", f"on a {bg}, {rel}"))
        return plan
    with_pos = rng.random() < 0.5
    rest = _join([obj_pos(o) if with_pos else obj(o) for o in objs[2:]])
    plan.template = f"{rel}, {rng.choice(('plus', 'and', 'with'))} {rest}, on a {bg}"
    return plan


def _compact(scene: Scene, rng: random.Random) -> CaptionPlan:
    """The shortest wording (colours and shapes only): fits MAX_CAPTION_TOKENS for 4 objects."""
    plan = CaptionPlan()
    objs = list(scene.objects)
    rng.shuffle(objs)
    names = []
    for o in objs:
        color = rng.choice(COLORS[o.color][1])
        plan.mentions.append(Mention(_index(scene, o), None, color, rng.choice(SHAPES[o.shape])))
        names.append("{%d}" % (len(plan.mentions) - 1))
    plan.template = f"{_join(names)} on {rng.choice(BACKGROUNDS[scene.background][1])}"
    return plan


def make_caption_plan(scene: Scene, rng: random.Random) -> tuple[str, CaptionPlan]:
    """One caption of ``scene`` and the plan it was rendered from; different ``rng`` states
    give different wordings. Wordings longer than MAX_CAPTION_TOKENS are redrawn, so no object
    is lost to truncation."""
    for _ in range(8):
        plan = _compose(scene, rng)
        text = render_caption(plan)
        if count_tokens(text) <= MAX_CAPTION_TOKENS:
            return text, plan
    plan = _compact(scene, rng)
    return render_caption(plan), plan


def make_caption(scene: Scene, rng: random.Random) -> str:
    """One caption of ``scene`` (``make_caption_plan`` without the plan)."""
    return make_caption_plan(scene, rng)[0]


def make_sample_plans(seed: int, split: str, index: int, image_size: int, num_captions: int):
    """(JPEG bytes, metadata without image_id/source, captions, caption plans) of one image;
    pure function. The metadata's ``background``, ``texture`` and ``objects`` are the scene."""
    rng = sample_rng(seed, split, index)
    scene = sample_scene(rng, image_size)
    image = draw_scene(scene, image_size)
    captions: list[str] = []
    plans: list[CaptionPlan] = []
    for _ in range(num_captions):
        for _attempt in range(20):  # val: the captions of one image are worded differently
            caption, plan = make_caption_plan(scene, rng)
            if caption not in captions:
                break
        captions.append(caption)
        plans.append(plan)
    meta = {
        "width": image_size,
        "height": image_size,
        "background": scene.background,
        "texture": scene.texture,
        "objects": [o.to_json() for o in scene.objects],
    }
    return encode_jpeg(image), meta, captions, plans


def make_sample(seed: int, split: str, index: int, image_size: int, num_captions: int):
    """(JPEG bytes, metadata without image_id/source, captions) of one image; pure function."""
    return make_sample_plans(seed, split, index, image_size, num_captions)[:3]


# ---------------------------------------------------------------------------------- classify split
# A labelled split for zero-shot classification (mmpretrain.evaluation.classify): each image holds
# ONE object; ``label`` is its shape (8 classes) and ``color`` its colour (10 classes). Image ``i``
# has colour ``i % 10`` and shape ``(i + i // 40) % 8``: both labellings are balanced in every
# prefix, and every 80 consecutive images hold each (shape, colour) pair once (800: 10 times).
# Everything else (background, texture, size,
# cell, caption wording) from its own seed stream ``(seed, "classify", i)``: the train and val
# draws are untouched, and the split lives in its own directory with its own manifest, so the
# train/val shards and DIR/manifest.json are the same bytes with or without it.
CLASSIFY_DIR = "classify"
CLASSIFY_SPLIT = "classify"
CLASSIFY_TEMPLATES: dict[str, list[str]] = {
    # worded as the captions name one object ("A small red disc in the top left corner on a ...")
    "label": ["a {}.", "an image of a {}.", "there is a {}.", "a {} on a plain background."],
    # the colour of an object whatever its shape: one prompt per shape, averaged
    "color": [f"a {{}} {shape}." for shape in SHAPES],
}


def make_classify_sample(seed: int, index: int, image_size: int):
    """(JPEG bytes, metadata without image_id/source, caption, caption plan) of image ``index``
    of the classify split; pure function. ``meta["label"]`` is the shape, ``meta["color"]`` the
    colour of its one object."""
    rng = sample_rng(seed, CLASSIFY_SPLIT, index)
    shape = list(SHAPES)[(index + index // 40) % len(SHAPES)]
    color = list(COLORS)[index % len(COLORS)]
    rgb = COLORS[color][0]
    backgrounds = [b for b, (bg, _) in BACKGROUNDS.items() if _distance(rgb, bg) >= MIN_CONTRAST]
    background = rng.choice(backgrounds)
    cell = image_size / 3.0
    size = rng.choice(list(SIZES))
    radius = SIZES[size][0] * cell / 2.0
    slack = cell / 2.0 - radius
    row, col = divmod(rng.randrange(9), 3)
    cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
    cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
    scene = Scene(background, rng.choice(list(TEXTURES)), rng.randrange(2),
                  [SceneObject(shape, color, size, row, col, cx, cy, radius)])
    image = draw_scene(scene, image_size)
    caption, plan = make_caption_plan(scene, rng)
    meta = {"width": image_size, "height": image_size, "label": shape, "color": color,
            "background": scene.background, "texture": scene.texture,
            "objects": [o.to_json() for o in scene.objects]}
    return encode_jpeg(image), meta, caption, plan


def write_classify_split(out_dir: str | Path, num_images: int, seed: int = 0, image_size: int = 64,
                         samples_per_shard: int = 512) -> dict | None:
    """Write ``out_dir/classify/classify-NNNNNN.tar`` and ``out_dir/classify/manifest.json``
    (its own manifest: ``splits.classify`` plus ``classify.labels`` = ``{field: {"classes",
    "templates"}}``); returns that manifest. ``num_images`` 0 removes an earlier split."""
    if num_images < 0:
        raise ShardsError(f"--num-classify: must be >= 0 (got {num_images})")
    out = Path(out_dir) / CLASSIFY_DIR
    if num_images == 0:
        if out.is_dir():
            remove_stale_shards(out, CLASSIFY_SPLIT, set())
            (out / "manifest.json").unlink(missing_ok=True)
        return None
    out.mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(f"mmpretrain shards synthetic --num-classify {num_images} --seed {seed} "
                            f"--samples-per-shard {samples_per_shard} --image-size {image_size}")
    manifest["synthetic"] = {"seed": seed, "image_size": image_size, "jpeg_quality": JPEG_QUALITY}
    manifest["classify"] = {"labels": {
        "label": {"classes": list(SHAPES), "templates": CLASSIFY_TEMPLATES["label"], "what": "shape"},
        "color": {"classes": list(COLORS), "templates": CLASSIFY_TEMPLATES["color"], "what": "colour"},
    }}
    entry = {"shards": [], "num_samples": 0, "num_images": num_images, "captions_per_image": 1, "skipped": {}}
    manifest["splits"][CLASSIFY_SPLIT] = entry
    shard: TarShard | None = None
    with progress_bar(num_images, f"synthetic {CLASSIFY_SPLIT}", unit="image") as bar:
        for i in range(num_images):
            jpeg, meta, caption, plan = make_classify_sample(seed, i, image_size)
            key = f"{CLASSIFY_SPLIT}-{i:08d}"
            meta = {"image_id": key, "source": "synthetic", **meta, "caption_index": 0,
                    "caption_plan": plan.to_json()}
            if shard is None:
                shard = TarShard(out / shard_name(CLASSIFY_SPLIT, len(entry["shards"])))
            shard.add(key, sample_fields(jpeg, "jpg", caption, meta))
            if shard.num_samples == samples_per_shard:
                _close(shard, entry, out, manifest)
                shard = None
            bar.update(1)
    if shard is not None:
        _close(shard, entry, out, manifest)
    remove_stale_shards(out, CLASSIFY_SPLIT, {s["file"] for s in entry["shards"]})
    write_manifest(out, manifest)
    return manifest


# ---------------------------------------------------------------------------------- writing
def _write_split(out: Path, split: str, num_images: int, num_captions: int, seed: int,
                 image_size: int, samples_per_shard: int, manifest: dict) -> list[str]:
    """Write ``<split>-NNNNNN.tar``; the manifest is updated after every completed shard."""
    entry = {"shards": [], "num_samples": 0, "num_images": num_images, "captions_per_image": num_captions,
             "skipped": {}}
    manifest["splits"][split] = entry
    captions_all: list[str] = []
    shard: TarShard | None = None
    index_in_shard = 0
    with progress_bar(num_images, f"synthetic {split}", unit="image") as bar:
        for i in range(num_images):
            jpeg, meta, captions, plans = make_sample_plans(seed, split, i, image_size, num_captions)
            image_id = f"{split}-{i:08d}"
            meta = {"image_id": image_id, "source": "synthetic", **meta}
            for c, caption in enumerate(captions):
                if shard is None:
                    shard = TarShard(out / shard_name(split, len(entry["shards"])))
                key = image_id if num_captions == 1 else f"{image_id}_{c}"
                sample_meta = {**meta, "caption_index": c, "caption_plan": plans[c].to_json()}
                shard.add(key, sample_fields(jpeg, "jpg", caption, sample_meta))
                captions_all.append(caption)
                index_in_shard += 1
                if index_in_shard == samples_per_shard:
                    _close(shard, entry, out, manifest)
                    shard, index_in_shard = None, 0
            bar.update(1)
    if shard is not None:
        _close(shard, entry, out, manifest)
    remove_stale_shards(out, split, {s["file"] for s in entry["shards"]})
    write_manifest(out, manifest)
    return captions_all


def _close(shard: TarShard, entry: dict, out: Path, manifest: dict) -> None:
    shard.commit()
    entry["shards"].append({"file": shard.path.name, "num_samples": shard.num_samples})
    write_manifest(out, manifest)


def generate(out_dir: str, num_samples: int, num_val: int = 1000, seed: int = 0,
             samples_per_shard: int = 512, image_size: int = 64, vocab_size: int = 4096,
             train_tokenizer: bool = True, num_classify: int = 0) -> dict:
    """Write the synthetic train/val shards (+ tokenizer) into ``out_dir``; returns the manifest.

    ``num_samples`` train images with 1 caption each; ``num_val`` held-out images with 2
    captions each (2 * num_val val samples); ``num_classify`` > 0 also writes the labelled
    one-object split ``out_dir/classify/`` (``write_classify_split``; the command line's
    default is 800, this function's 0). The train/val shards and ``manifest.json`` do not
    depend on ``num_classify``.
    """
    for flag, value, low in (("--num-samples", num_samples, 1), ("--num-val", num_val, 0),
                             ("--samples-per-shard", samples_per_shard, 1), ("--image-size", image_size, 16)):
        if value < low:
            raise ShardsError(f"{flag}: must be >= {low} (got {value})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    created_by = (
        f"mmpretrain shards synthetic --num-samples {num_samples} --num-val {num_val} --seed {seed} "
        f"--samples-per-shard {samples_per_shard} --image-size {image_size} --vocab-size {vocab_size}"
    )
    manifest = read_manifest(out) or new_manifest(created_by)
    manifest["created_by"] = created_by
    manifest["synthetic"] = {"seed": seed, "image_size": image_size, "jpeg_quality": JPEG_QUALITY}
    train_captions = _write_split(out, "train", num_samples, 1, seed, image_size, samples_per_shard, manifest)
    if num_val > 0:
        _write_split(out, "val", num_val, 2, seed, image_size, samples_per_shard, manifest)
    else:
        manifest["splits"].pop("val", None)
        remove_stale_shards(out, "val", set())
        write_manifest(out, manifest)
    if train_tokenizer:
        from mmpretrain.data.tokenizer import train_tokenizer as train_wordpiece

        train_wordpiece(train_captions, str(out / "tokenizer"), vocab_size)
    if num_classify > 0 or (out / CLASSIFY_DIR).is_dir():
        write_classify_split(out, num_classify, seed=seed, image_size=image_size,
                             samples_per_shard=samples_per_shard)
    return manifest
