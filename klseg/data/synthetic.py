"""The built-in two-domain benchmark: street-like scenes in two looks.

Every scene has the same kind of geometry in both domains: a sky above a
horizon, ground below it, a road narrowing towards a vanishing point, buildings
standing on the horizon, trees with round crowns, and cars on the road. What
differs is the look:

- ``"source"``: a clear day. Blue sky, green grass, grey asphalt with a dashed
  centre line, brick or beige buildings with a window grid, dark green
  trees, yellow and magenta cars, even lighting and little sensor noise.
- ``"target"``: dusk in another town, seen through another camera. Deep blue
  to lilac sky with cloud bands, sandy ploughed ground, dark cracked road with
  yellow edge lines, blue-grey buildings with floor stripes and lit windows,
  red autumn trees, teal cars with head lights; a strong lighting gradient, a
  vignette, a colour cast, a blur and heavy noise.

The target palette reuses source colours for other classes (its buildings are
sky-blue, its trees brick-red, its ground beige like a source building), so a
model trained on the source is not merely unsure on the target but confidently
wrong, and fine-tuning on the target overwrites what it knew about the source.
Shapes and layout are shared, so part of what a model learns transfers.

The module uses numpy only (no TensorFlow), so it also feeds the JAX backend.
Images are ``uint8`` RGB, masks ``uint8`` class indices; every image depends
only on ``(seed, domain, index)``, so ``generate`` is deterministic and the
first ``k`` images of a call with ``num_images > k`` equal those of a call with
``num_images=k``.

Example:

>>> images, masks = generate("target", 4, image_size=32, seed=1)
>>> images.shape, images.dtype, masks.shape, int(masks.max()) < NUM_CLASSES
((4, 32, 32, 3), dtype('uint8'), (4, 32, 32), True)
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from klseg.files import make_temp_dir

__all__ = [
    "CLASS_NAMES",
    "DOMAINS",
    "IGNORE_VALUE",
    "NUM_CLASSES",
    "PALETTE",
    "generate",
    "write_benchmark",
    "write_png",
]

CLASS_NAMES = ("sky", "ground", "road", "building", "tree", "car")
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_VALUE = 255
DOMAINS = ("source", "target")

# Display colours for masks (overlays, palette PNGs); not the scene colours.
PALETTE = np.array(
    [
        [70, 130, 180],  # sky
        [152, 251, 152],  # ground
        [128, 64, 128],  # road
        [70, 70, 70],  # building
        [107, 142, 35],  # tree
        [0, 0, 142],  # car
    ],
    dtype=np.uint8,
)

SKY, GROUND, ROAD, BUILDING, TREE, CAR = range(NUM_CLASSES)

# Seed words that keep the random streams of splits and domains apart.
_DOMAIN_WORD = {"source": 0, "target": 1}
_SPLIT_WORD = {"generate": 0, "train": 1, "val": 2, "unlabeled": 3}


def _check_domain(domain):
    if domain not in _DOMAIN_WORD:
        raise ValueError(
            f"`domain` must be one of {list(DOMAINS)}. Received: domain={domain!r}"
        )


def _check_positive(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`{name}` must be an integer. Received: {name}={value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}. Received: {name}={value!r}")


# --------------------------------------------------------------------------
# Geometry (shared by both domains)
# --------------------------------------------------------------------------


def _sample_layout(rng, size):
    """Draws the scene geometry in pixel units."""
    s = float(size)
    horizon = rng.uniform(0.34, 0.52) * s
    vanish_x = rng.uniform(0.3, 0.7) * s
    road_top_half = rng.uniform(0.02, 0.05) * s
    road_left = rng.uniform(-0.25, 0.3) * s
    road_right = rng.uniform(0.7, 1.25) * s
    buildings = []
    for _ in range(rng.integers(1, 4)):
        width = rng.uniform(0.12, 0.32) * s
        x0 = rng.uniform(-0.05, 0.95) * s - width / 2
        top = rng.uniform(0.06, 0.75) * horizon
        roof = rng.uniform(0.0, 0.12) * s if rng.random() < 0.4 else 0.0
        buildings.append((x0, x0 + width, top, roof))
    objects = []
    for _ in range(rng.integers(0, 4)):
        base = horizon + rng.uniform(0.06, 0.45) * (s - horizon)
        depth = (base - horizon) / (s - horizon)  # 0 at horizon, 1 at bottom
        radius = (0.1 + 0.12 * depth) * s
        # trees stand beside the road
        left_edge, right_edge = _road_edges(
            base, horizon, vanish_x, road_top_half, road_left, road_right, s
        )
        if rng.random() < 0.5:
            x = rng.uniform(-0.05 * s, max(left_edge - radius * 0.5, 0.0))
        else:
            x = rng.uniform(min(right_edge + radius * 0.5, s), 1.05 * s)
        objects.append(("tree", base, x, radius))
    for _ in range(rng.integers(1, 4)):
        base = horizon + rng.uniform(0.2, 0.95) * (s - horizon)
        depth = (base - horizon) / (s - horizon)
        width = (0.18 + 0.3 * depth) * s * rng.uniform(0.85, 1.15)
        left_edge, right_edge = _road_edges(
            base, horizon, vanish_x, road_top_half, road_left, road_right, s
        )
        low, high = left_edge + width * 0.3, right_edge - width * 0.3
        # A wide car on a narrow stretch of road: centre it.
        x = rng.uniform(low, high) if high > low else (left_edge + right_edge) / 2
        objects.append(("car", base, x, width))
    objects.sort(key=lambda item: item[1])  # far to near
    return {
        "horizon": horizon,
        "vanish_x": vanish_x,
        "road_top_half": road_top_half,
        "road_left": road_left,
        "road_right": road_right,
        "buildings": buildings,
        "objects": objects,
    }


def _road_edges(y, horizon, vanish_x, top_half, left, right, s):
    t = np.clip((y - horizon) / (s - horizon), 0.0, 1.0)
    return (
        (vanish_x - top_half) + t * (left - (vanish_x - top_half)),
        (vanish_x + top_half) + t * (right - (vanish_x + top_half)),
    )


def _render_mask(layout, size):
    """Paints class indices far to near; returns the mask and part maps."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    mask = np.full((size, size), SKY, dtype=np.uint8)
    parts = _empty_parts(size)
    grid = (yy, xx, float(size))
    _mask_buildings(mask, parts, layout, grid)
    _mask_ground_and_road(mask, parts, layout, grid)
    for index, (kind, base, x, extent) in enumerate(layout["objects"]):
        if kind == "tree":
            _mask_tree(mask, parts, base, x, extent, grid)
        else:
            _mask_car(mask, parts, index, base, x, extent, grid)
    parts["lane"] &= mask == ROAD
    return mask, parts


def _empty_parts(size):
    """The part maps of a scene before anything is painted."""
    return {
        "building_id": np.full((size, size), -1, dtype=np.int16),
        "window": np.zeros((size, size), dtype=bool),
        "roof": np.zeros((size, size), dtype=bool),
        "car_glass": np.zeros((size, size), dtype=bool),
        "car_wheel": np.zeros((size, size), dtype=bool),
        "car_light": np.zeros((size, size), dtype=bool),
        "car_id": np.full((size, size), -1, dtype=np.int16),
        "trunk": np.zeros((size, size), dtype=bool),
        "lane": np.zeros((size, size), dtype=bool),
    }


def _mask_buildings(mask, parts, layout, grid):
    """Buildings on the horizon (gable roofs, a window grid)."""
    yy, xx, _ = grid
    horizon = layout["horizon"]
    for index, (x0, x1, top, roof) in enumerate(layout["buildings"]):
        body = (xx >= x0) & (xx < x1) & (yy >= top) & (yy < horizon + 1)
        region = body
        if roof > 0:
            cx = 0.5 * (x0 + x1)
            half = 0.5 * (x1 - x0)
            gable = (yy >= top - roof) & (yy < top)
            gable &= np.abs(xx - cx) <= half * (yy - (top - roof)) / roof
            region = body | gable
            parts["roof"] |= gable
        mask[region] = BUILDING
        parts["building_id"][region] = index
        height = horizon - top
        floor = max(height / 6.0, 2.0)
        column = max((x1 - x0) / 4.0, 2.0)
        win = body & (((yy - top) % floor) > floor * 0.45)
        win &= ((xx - x0) % column) > column * 0.45
        win &= (yy < horizon - floor * 0.5) & (xx > x0 + 1) & (xx < x1 - 1)
        parts["window"] |= win


def _mask_ground_and_road(mask, parts, layout, grid):
    """Ground below the horizon, the road on it and its dashed centre line."""
    yy, xx, s = grid
    horizon = layout["horizon"]
    ground = yy >= horizon
    mask[ground] = GROUND
    parts["building_id"][ground] = -1
    parts["window"] &= ~ground
    left, right = _layout_road_edges(yy, layout, s)
    road = ground & (xx >= left) & (xx < right)
    mask[road] = ROAD
    centre = 0.5 * (left + right)
    depth = np.clip((yy - horizon) / (s - horizon), 0.0, 1.0)
    lane_half = 0.004 * s + 0.012 * s * depth
    dash = (np.maximum(yy - horizon, 0.0) ** 0.6 % 3.0) < 1.5
    parts["lane"] = road & (np.abs(xx - centre) < lane_half) & dash


def _layout_road_edges(yy, layout, s):
    return _road_edges(
        yy,
        layout["horizon"],
        layout["vanish_x"],
        layout["road_top_half"],
        layout["road_left"],
        layout["road_right"],
        s,
    )


def _mask_tree(mask, parts, base, x, radius, grid):
    """A trunk standing on ``base`` under a round crown."""
    yy, xx, _ = grid
    trunk_h = radius * 0.8
    trunk_w = max(radius * 0.3, 1.5)
    trunk = (np.abs(xx - x) < trunk_w / 2) & (yy < base) & (yy >= base - trunk_h)
    cy = base - trunk_h - radius * 0.7
    crown = ((xx - x) / radius) ** 2 + ((yy - cy) / (radius * 1.1)) ** 2 < 1
    mask[trunk | crown] = TREE
    parts["trunk"] = (parts["trunk"] | trunk) & ~crown
    for key in ("car_glass", "car_wheel", "car_light"):
        parts[key] &= ~(trunk | crown)


def _mask_car(mask, parts, index, base, x, width, grid):
    """A car body with rounded corners, a cabin, wheels and head lights."""
    yy, xx, _ = grid
    height = width * 0.42
    top = base - height
    body_top = top + height * 0.45
    body = (np.abs(xx - x) < width / 2) & (yy >= body_top) & (yy < base)
    # rounded corners
    corner = height * 0.2
    cx = np.clip(xx, x - width / 2 + corner, x + width / 2 - corner)
    cy = np.clip(yy, body_top + corner, base - corner)
    body &= (xx - cx) ** 2 + (yy - cy) ** 2 <= corner**2 + 0.25
    cabin_half = width * 0.32 * (0.65 + 0.35 * (yy - top) / (body_top - top))
    cabin = (np.abs(xx - x) < cabin_half) & (yy >= top) & (yy < body_top)
    wheel_r = height * 0.22
    wheels = np.zeros_like(body)
    for side in (-1, 1):
        wx = x + side * width * 0.3
        wheels |= (xx - wx) ** 2 + (yy - (base - wheel_r * 0.6)) ** 2 < wheel_r**2
    region = body | cabin | wheels
    mask[region] = CAR
    for key in ("car_glass", "car_wheel", "car_light", "trunk"):
        parts[key] &= ~region
    parts["car_id"][region] = index
    parts["car_glass"] |= cabin & (np.abs(xx - x) < cabin_half - 0.8)
    parts["car_glass"] &= yy >= top + 0.8
    parts["car_wheel"] |= wheels & ~body | (wheels & (yy > base - wheel_r))
    light = body & (yy >= body_top + height * 0.1) & (yy < body_top + height * 0.3)
    light &= np.abs(np.abs(xx - x) - width * 0.38) < width * 0.07
    parts["car_light"] |= light


# --------------------------------------------------------------------------
# Appearance (differs by domain)
# --------------------------------------------------------------------------


def _smooth_noise(rng, size, cells):
    """Low-frequency noise in [-1, 1]: bilinear upsampling of a coarse grid."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1)).astype(np.float32)
    coords = np.linspace(0.0, cells, size, dtype=np.float32)
    low = np.minimum(coords.astype(np.int64), cells - 1)
    frac = (coords - low)[:, None]
    rows = grid[low] * (1 - frac) + grid[low + 1] * frac  # (size, cells + 1)
    return rows[:, low] * (1 - frac.T) + rows[:, low + 1] * frac.T


def _box_blur(image, radius):
    if radius <= 0:
        return image
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    out = np.zeros_like(image)
    count = 0
    h, w = image.shape[:2]
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out += padded[dy : dy + h, dx : dx + w]
            count += 1
    return out / count


def _jitter(rng, colour, amount):
    colour = np.asarray(colour, dtype=np.float32)
    return colour + rng.uniform(-amount, amount, size=3).astype(np.float32)


def _paint_source(rng, mask, parts, layout, size):
    yy = (np.arange(size, dtype=np.float32) + 0.5)[:, None]
    img = np.zeros((size, size, 3), dtype=np.float32)
    horizon = layout["horizon"]

    # sky: blue gradient, brighter towards the horizon
    t = np.clip(yy / max(horizon, 1.0), 0, 1)[..., None]
    top, bottom = _jitter(rng, (90, 150, 225), 12), _jitter(rng, (185, 215, 245), 10)
    sky = (1 - t) * top + t * bottom
    img[:] = np.broadcast_to(sky, img.shape)

    # ground: grass with soft blotches
    grass = _jitter(rng, (75, 145, 55), 12)
    blotch = _smooth_noise(rng, size, 6)[..., None]
    ground = grass + blotch * np.array([10, 18, 8], np.float32)
    sel = mask == GROUND
    img[sel] = ground[sel]

    # road: grey asphalt, fine grain, white dashes
    asphalt = _jitter(rng, (112, 112, 118), 10)
    grain = rng.normal(0, 5, size=(size, size, 1)).astype(np.float32)
    sel = mask == ROAD
    img[sel] = (asphalt + grain)[sel]
    img[parts["lane"]] = _jitter(rng, (235, 235, 235), 10)

    # buildings: brick / beige / grey, dark window grid
    choices = [(165, 80, 60), (205, 185, 140)]
    for index in range(len(layout["buildings"])):
        colour = _jitter(rng, choices[rng.integers(len(choices))], 12)
        sel = (parts["building_id"] == index) & (mask == BUILDING)
        img[sel] = colour
    img[parts["roof"] & (mask == BUILDING)] = _jitter(rng, (110, 60, 50), 10)
    img[parts["window"] & (mask == BUILDING)] = _jitter(rng, (55, 65, 90), 8)

    # trees: dark blue-green crowns, brown trunks
    crown = _jitter(rng, (25, 80, 45), 8)
    leaves = rng.normal(0, 8, size=(size, size, 1)).astype(np.float32)
    sel = mask == TREE
    img[sel] = (crown + leaves)[sel]
    img[parts["trunk"] & sel] = _jitter(rng, (95, 62, 32), 8)

    # cars: yellow or magenta paint, dark glass, black wheels
    paints = [(235, 200, 40), (200, 40, 160)]
    for index in np.unique(parts["car_id"][parts["car_id"] >= 0]):
        sel = (parts["car_id"] == index) & (mask == CAR)
        img[sel] = _jitter(rng, paints[rng.integers(len(paints))], 15)
    car = mask == CAR
    img[parts["car_glass"] & car] = _jitter(rng, (60, 80, 100), 8)
    img[parts["car_wheel"] & car] = _jitter(rng, (25, 25, 25), 5)

    # even lighting, little noise
    img *= rng.uniform(0.9, 1.1)
    img += rng.normal(0, 3.0, size=img.shape).astype(np.float32)
    return img


def _paint_target(rng, mask, parts, layout, size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    img = np.zeros((size, size, 3), dtype=np.float32)
    grid = (yy, xx, float(size))
    # Each step draws from ``rng`` in turn: their order is the image.
    _target_sky_and_ground(rng, img, mask, layout, grid)
    _target_road(rng, img, mask, layout, grid)
    _target_buildings(rng, img, mask, parts, layout, grid)
    _target_trees_and_cars(rng, img, mask, parts, size)
    return _target_camera(rng, img, grid)


def _target_sky_and_ground(rng, img, mask, layout, grid):
    yy, xx, s = grid
    size = img.shape[0]
    horizon = layout["horizon"]

    # sky: deep blue at the top to lilac at the horizon, with cloud bands
    t = np.clip(yy / max(horizon, 1.0), 0, 1)[..., None]
    top, bottom = _jitter(rng, (45, 55, 115), 12), _jitter(rng, (170, 140, 180), 12)
    sky = (1 - t) * top + t * bottom
    bands = np.sin(yy * (2 * np.pi / (0.09 * s)) + _smooth_noise(rng, size, 3) * 3)
    sky = sky + (bands[..., None] > 0.6) * np.array([25, 20, 25], np.float32)
    img[:] = sky

    # ground: sandy ploughed field, furrows towards the vanishing point
    sand = _jitter(rng, (195, 175, 135), 12)
    angle = np.arctan2(xx - layout["vanish_x"], yy - horizon + 1.0)
    furrow = np.sin(angle * 40.0)[..., None]
    ground = sand + furrow * np.array([22, 20, 16], np.float32)
    sel = mask == GROUND
    img[sel] = ground[sel]


def _target_road(rng, img, mask, layout, grid):
    """Dark, cracked, yellow edge lines, no centre dashes."""
    yy, xx, s = grid
    tar = _jitter(rng, (88, 82, 90), 8)
    cracks = (np.abs(_smooth_noise(rng, img.shape[0], 10)) < 0.06)[..., None]
    road = tar - cracks * 25.0
    left, right = _layout_road_edges(yy, layout, s)
    depth = np.clip((yy - layout["horizon"]) / (s - layout["horizon"]), 0, 1)
    edge_w = 0.004 * s + 0.012 * s * depth
    edge = (np.abs(xx - left - 2 * edge_w) < edge_w) | (
        np.abs(xx - right + 2 * edge_w) < edge_w
    )
    sel = mask == ROAD
    img[sel] = road[sel]
    img[sel & edge] = _jitter(rng, (220, 190, 40), 10)


def _target_buildings(rng, img, mask, parts, layout, grid):
    """Sky-blue concrete with floor stripes and lit windows."""
    yy = grid[0]
    size = img.shape[0]
    concrete = [(125, 160, 205), (150, 175, 200), (105, 135, 180)]
    for index, (_x0, _x1, top_y, _roof) in enumerate(layout["buildings"]):
        colour = _jitter(rng, concrete[rng.integers(len(concrete))], 10)
        sel = (parts["building_id"] == index) & (mask == BUILDING)
        floor = max((layout["horizon"] - top_y) / 6.0, 2.0)
        stripes = (((yy - top_y) % floor) < floor * 0.3)[..., None]
        img[sel] = (colour - stripes * 35.0)[sel]
    lit = parts["window"] & (mask == BUILDING) & (rng.random((size, size)) < 0.5)
    img[lit] = _jitter(rng, (250, 225, 120), 8)
    img[parts["roof"] & (mask == BUILDING)] = _jitter(rng, (80, 90, 110), 8)


def _target_trees_and_cars(rng, img, mask, parts, size):
    # trees: autumn crowns in brick reds, speckled; dark trunks
    crown = _jitter(rng, (160, 50, 40), 12)
    speckle = (rng.random((size, size, 1)) < 0.25) * np.array([50, 45, 10], np.float32)
    sel = mask == TREE
    img[sel] = (crown + speckle)[sel]
    img[parts["trunk"] & sel] = _jitter(rng, (40, 30, 30), 6)

    # cars: teal paint, pale glass, bright head lights
    paints = [(50, 160, 130), (40, 130, 150)]
    for index in np.unique(parts["car_id"][parts["car_id"] >= 0]):
        sel = (parts["car_id"] == index) & (mask == CAR)
        img[sel] = _jitter(rng, paints[rng.integers(len(paints))], 10)
    car = mask == CAR
    img[parts["car_glass"] & car] = _jitter(rng, (150, 165, 175), 10)
    img[parts["car_wheel"] & car] = _jitter(rng, (15, 15, 20), 4)
    img[parts["car_light"] & car] = _jitter(rng, (255, 250, 210), 5)


def _target_camera(rng, img, grid):
    """Blur, directional lighting, vignette, colour cast, gamma, noise."""
    yy, xx, s = grid
    img = 0.5 * img + 0.5 * _box_blur(img, max(1, img.shape[0] // 96))
    direction = rng.uniform(0, 2 * np.pi)
    ramp = ((xx - s / 2) * np.cos(direction) + (yy - s / 2) * np.sin(direction)) / s
    light = 0.9 + 0.4 * ramp
    radius2 = ((xx - s / 2) ** 2 + (yy - s / 2) ** 2) / (s / 2) ** 2
    light = light * (1.0 - 0.25 * radius2)
    img *= light[..., None]
    img *= np.array([1.08, 0.96, 0.88], np.float32) * rng.uniform(0.95, 1.05, 3)
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** rng.uniform(1.0, 1.2)
    img += rng.normal(0, 6.0, size=img.shape).astype(np.float32)
    return img


def _render(domain, size, entropy):
    """Renders one (image, mask) pair from a seed-sequence entropy tuple."""
    geometry_rng = np.random.default_rng([*entropy, 0])
    appearance_rng = np.random.default_rng([*entropy, 1])
    layout = _sample_layout(geometry_rng, size)
    mask, parts = _render_mask(layout, size)
    paint = _paint_source if domain == "source" else _paint_target
    image = paint(appearance_rng, mask, parts, layout, size)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def _generate(domain, num_images, image_size, seed, split):
    _check_domain(domain)
    _check_positive("num_images", num_images, minimum=0)
    _check_positive("image_size", image_size, minimum=8)
    _check_positive("seed", seed, minimum=0)
    images = np.zeros((num_images, image_size, image_size, 3), dtype=np.uint8)
    masks = np.zeros((num_images, image_size, image_size), dtype=np.uint8)
    for index in range(num_images):
        entropy = (int(seed), _DOMAIN_WORD[domain], _SPLIT_WORD[split], index)
        images[index], masks[index] = _render(domain, image_size, entropy)
    return images, masks


def generate(domain, num_images, *, image_size=64, seed=0):
    """Generates scenes of one domain of the built-in benchmark.

    Args:
        domain: ``"source"`` or ``"target"``.
        num_images: Number of scenes, ``>= 0``.
        image_size: Side of the square images in pixels, ``>= 8``.
            Defaults to ``64``.
        seed: Non-negative integer. Scene ``i`` depends only on
            ``(seed, domain, i)``. Defaults to ``0``.

    Returns:
        ``(images, masks)``: ``uint8`` arrays of shapes
        ``(num_images, image_size, image_size, 3)`` and
        ``(num_images, image_size, image_size)``; mask values are class
        indices in ``[0, NUM_CLASSES)`` (see ``CLASS_NAMES``).

    Raises:
        ValueError: for an unknown domain or a bad count, size or seed.
    """
    return _generate(domain, num_images, image_size, seed, "generate")


# --------------------------------------------------------------------------
# Writing the benchmark in the folder format
# --------------------------------------------------------------------------


def _png_bytes(array):
    """Encodes a uint8 HxW (grey) or HxWx3 (RGB) array as PNG (stdlib only)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim == 2:
        colour_type, channels = 0, 1
    elif array.ndim == 3 and array.shape[2] == 3:
        colour_type, channels = 2, 3
    else:
        raise ValueError(
            "`array` must have shape (H, W) or (H, W, 3). "
            f"Received: array.shape={array.shape}"
        )
    height, width = array.shape[:2]
    rows = array.reshape(height, width * channels)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(tag, data):
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


#: What ``write_benchmark`` writes (and so may replace with overwrite=True).
_BENCHMARK_ENTRIES = ("source", "target", "classes.json", ".klseg.json")


def write_png(path, array):
    """Writes a uint8 (H, W) or (H, W, 3) array as an 8-bit PNG file."""
    Path(path).write_bytes(_png_bytes(array))


def write_benchmark(
    output_dir,
    *,
    image_size=64,
    num_train=256,
    num_val=64,
    num_unlabeled=128,
    num_target_train=32,
    seed=0,
    overwrite=False,
):
    """Writes the built-in two-domain benchmark in klseg's folder format.

    Layout::

        DIR/classes.json                      class names, ignore value
        DIR/source/train/{images,masks}/      num_train labelled scenes
        DIR/source/val/{images,masks}/        num_val
        DIR/source/unlabeled/images/          num_unlabeled
        DIR/target/train/{images,masks}/      num_target_train (a few)
        DIR/target/val/{images,masks}/        num_val
        DIR/target/unlabeled/images/          num_unlabeled

    Images are RGB PNGs and masks single-channel PNGs of class indices with
    matching stems (``000000.png``). Each split has its own random stream, so
    no scene appears in two splits. The tree is built in a temporary folder
    next to ``output_dir`` and renamed into place.

    Args:
        output_dir: Folder to create.
        image_size: Side of the square images. Defaults to ``64``.
        num_train: Labelled source training scenes. Defaults to ``256``.
        num_val: Validation scenes per domain. Defaults to ``64``.
        num_unlabeled: Unlabelled scenes per domain. Defaults to ``128``.
        num_target_train: Labelled target training scenes (the few labels a
            user has in the new domain). Defaults to ``32``.
        seed: Non-negative integer. Defaults to ``0``.
        overwrite: Replace an existing ``output_dir``. Defaults to ``False``.

    Returns:
        The ``Path`` of ``output_dir``.

    Raises:
        FileExistsError: ``output_dir`` exists, is not empty, and
            ``overwrite`` is ``False``.
    """
    for name, value in (
        ("num_train", num_train),
        ("num_val", num_val),
        ("num_unlabeled", num_unlabeled),
        ("num_target_train", num_target_train),
    ):
        _check_positive(name, value, minimum=0)
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    staging = make_temp_dir(output_dir.parent, ".synth-")
    plan = [
        ("source", "train", num_train, True),
        ("source", "val", num_val, True),
        ("source", "unlabeled", num_unlabeled, False),
        ("target", "train", num_target_train, True),
        ("target", "val", num_val, True),
        ("target", "unlabeled", num_unlabeled, False),
    ]
    for domain, split, count, labelled in plan:
        _write_split(
            staging / domain / split, domain, split, count, labelled, image_size, seed
        )
    info = {
        "class_names": list(CLASS_NAMES),
        "num_classes": NUM_CLASSES,
        "ignore_value": IGNORE_VALUE,
        "palette": PALETTE.tolist(),
        "image_size": image_size,
        "seed": seed,
    }
    (staging / "classes.json").write_text(json.dumps(info, indent=2) + "\n")
    if output_dir.exists():
        _remove_tree(output_dir)
    os.replace(staging, output_dir)
    return output_dir


def _check_output_dir(output_dir, overwrite):
    """An empty or absent folder, or (with ``overwrite``) an earlier benchmark."""
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{output_dir} exists and is not empty; pass overwrite=True "
                "(or choose another folder)."
            )
        foreign = sorted(
            p.name for p in output_dir.iterdir() if p.name not in _BENCHMARK_ENTRIES
        )
        if foreign:
            raise FileExistsError(
                f"{output_dir} holds files that are not part of a benchmark "
                f"({', '.join(foreign[:4])}); overwrite=True replaces only an "
                "earlier benchmark. Choose another folder."
            )


def _write_split(folder, domain, split, count, labelled, image_size, seed):
    """``folder/images/`` (and ``folder/masks/`` when ``labelled``) as PNGs."""
    images, masks = _generate(domain, count, image_size, seed, split)
    image_dir = folder / "images"
    image_dir.mkdir(parents=True)
    if labelled:
        mask_dir = folder / "masks"
        mask_dir.mkdir()
    for index in range(count):
        write_png(image_dir / f"{index:06d}.png", images[index])
        if labelled:
            write_png(mask_dir / f"{index:06d}.png", masks[index])


def _remove_tree(path):
    import shutil

    shutil.rmtree(path)
