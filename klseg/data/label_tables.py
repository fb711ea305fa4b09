"""Label tables of the field's data sets: raw label value -> class -> name.

Each ``LabelTable`` lists every raw value a data set's label files may hold,
with the training class it becomes (or ``None``: ignored). A value outside
the table is an error, not an ignored pixel, so that a wrong file (a colour
mask, a train-id mask given as label ids) is found when the data is loaded.

- ``CITYSCAPES``: the label ids 0..33 of cityscapesScripts'
  ``cityscapesscripts/helpers/labels.py`` and their ``trainId`` column: 19
  training classes. The same ids label GTA5, ACDC and Dark Zurich.
  (``license plate`` has id -1 there and never appears in a label image.)
- ``SYNTHIA16`` and ``SYNTHIA13``: the class ids 0..22 of SYNTHIA
  RAND-CITYSCAPES (its README), reduced to the 16 (or 13) classes it shares
  with Cityscapes, in the Cityscapes order.
- ``VOC``: the 21 classes of PASCAL VOC 2012 (its devkit); 255 marks object
  borders and is ignored.
- ``ADE20K``: the 150 classes of the SceneParsing benchmark
  (ADEChallengeData2016, ``objectInfo150``), named as mmsegmentation's
  ``ADE20KDataset`` names them; 0 ("other") is ignored and 1..150 become
  classes 0..149.

Standard library only.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "ADE20K",
    "ADE20K_CLASS_NAMES",
    "CITYSCAPES",
    "CITYSCAPES_CLASS_NAMES",
    "CITYSCAPES_LABELS",
    "SYNTHIA13",
    "SYNTHIA16",
    "SYNTHIA_LABELS",
    "VOC",
    "VOC_CLASS_NAMES",
    "LabelTable",
]


class LabelTable(NamedTuple):
    """A data set's raw label values and the classes they become.

    Attributes:
        name: The data set, for messages.
        class_names: The training classes, in class index order.
        rows: ``(raw value, raw name, class index or None)`` for every raw
            value the label files may hold; ``None`` means ignored.
        origin: Where the table comes from.
    """

    name: str
    class_names: tuple
    rows: tuple
    origin: str

    def class_map(self, ignore_value=255):
        """``{raw value: class index}``, ignored values mapped to
        ``ignore_value``.

        Example:

        >>> VOC.class_map()[255], VOC.class_map()[15]
        (255, 15)
        """
        return {
            raw: ignore_value if target is None else target
            for raw, _, target in self.rows
        }

    def raw_values(self):
        """The raw values the label files may hold, sorted."""
        return sorted(raw for raw, _, _ in self.rows)


# --------------------------------------------------------------------------
# Cityscapes (and GTA5, ACDC, Dark Zurich, which use its label ids)
# --------------------------------------------------------------------------

CITYSCAPES_CLASS_NAMES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

# (name, id, trainId) of cityscapesScripts' labels.py; None for trainId 255.
CITYSCAPES_LABELS = (
    ("unlabeled", 0, None),
    ("ego vehicle", 1, None),
    ("rectification border", 2, None),
    ("out of roi", 3, None),
    ("static", 4, None),
    ("dynamic", 5, None),
    ("ground", 6, None),
    ("road", 7, 0),
    ("sidewalk", 8, 1),
    ("parking", 9, None),
    ("rail track", 10, None),
    ("building", 11, 2),
    ("wall", 12, 3),
    ("fence", 13, 4),
    ("guard rail", 14, None),
    ("bridge", 15, None),
    ("tunnel", 16, None),
    ("pole", 17, 5),
    ("polegroup", 18, None),
    ("traffic light", 19, 6),
    ("traffic sign", 20, 7),
    ("vegetation", 21, 8),
    ("terrain", 22, 9),
    ("sky", 23, 10),
    ("person", 24, 11),
    ("rider", 25, 12),
    ("car", 26, 13),
    ("truck", 27, 14),
    ("bus", 28, 15),
    ("caravan", 29, None),
    ("trailer", 30, None),
    ("train", 31, 16),
    ("motorcycle", 32, 17),
    ("bicycle", 33, 18),
)

CITYSCAPES = LabelTable(
    "Cityscapes",
    CITYSCAPES_CLASS_NAMES,
    tuple((raw, name, target) for name, raw, target in CITYSCAPES_LABELS),
    "cityscapesScripts, cityscapesscripts/helpers/labels.py (id -> trainId)",
)

# --------------------------------------------------------------------------
# SYNTHIA RAND-CITYSCAPES
# --------------------------------------------------------------------------

# The class ids of SYNTHIA RAND-CITYSCAPES (its README.txt), in id order.
SYNTHIA_LABELS = (
    "void",
    "sky",
    "building",
    "road",
    "sidewalk",
    "fence",
    "vegetation",
    "pole",
    "car",
    "traffic sign",
    "pedestrian",
    "bicycle",
    "motorcycle",
    "parking-slot",
    "road-work",
    "traffic light",
    "terrain",
    "rider",
    "truck",
    "bus",
    "train",
    "wall",
    "lanemarking",
)

# (SYNTHIA id, Cityscapes class name) of the 16 shared classes, in the
# Cityscapes order; the same pairs as the SYNTHIA conversion of DACS and
# DAFormer (tools/convert_datasets/synthia.py).
_SYNTHIA_SHARED = (
    (3, "road"),
    (4, "sidewalk"),
    (2, "building"),
    (21, "wall"),
    (5, "fence"),
    (7, "pole"),
    (15, "traffic light"),
    (9, "traffic sign"),
    (6, "vegetation"),
    (1, "sky"),
    (10, "person"),
    (17, "rider"),
    (8, "car"),
    (19, "bus"),
    (12, "motorcycle"),
    (11, "bicycle"),
)


def _synthia(dropped):
    shared = [(raw, name) for raw, name in _SYNTHIA_SHARED if name not in dropped]
    index = {raw: position for position, (raw, _) in enumerate(shared)}
    rows = tuple((raw, name, index.get(raw)) for raw, name in enumerate(SYNTHIA_LABELS))
    return LabelTable(
        f"SYNTHIA ({len(shared)} classes)",
        tuple(name for _, name in shared),
        rows,
        "SYNTHIA RAND-CITYSCAPES README (ids), reduced to the classes shared "
        "with Cityscapes as in DACS/DAFormer's synthia conversion",
    )


SYNTHIA16 = _synthia(())
SYNTHIA13 = _synthia(("wall", "fence", "pole"))

# --------------------------------------------------------------------------
# PASCAL VOC 2012
# --------------------------------------------------------------------------

VOC_CLASS_NAMES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

VOC = LabelTable(
    "PASCAL VOC 2012",
    VOC_CLASS_NAMES,
    (
        *((raw, name, raw) for raw, name in enumerate(VOC_CLASS_NAMES)),
        (255, "border", None),
    ),
    "the PASCAL VOC 2012 devkit (palette index = class; 255 = object border)",
)

# --------------------------------------------------------------------------
# ADE20K (SceneParsing, ADEChallengeData2016)
# --------------------------------------------------------------------------

ADE20K_CLASS_NAMES = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)

ADE20K = LabelTable(
    "ADE20K",
    ADE20K_CLASS_NAMES,
    (
        (0, "other", None),
        *((raw, name, raw - 1) for raw, name in enumerate(ADE20K_CLASS_NAMES, 1)),
    ),
    "ADEChallengeData2016 objectInfo150 (values 1..150), names as "
    "mmsegmentation's ADE20KDataset; 0 is ignored (reduce_zero_label)",
)
