"""Tests for klseg.data's image reader, label checks, sources and layering."""

import os

import numpy as np
import pytest
from PIL import Image

from klseg.errors import DataError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _save(path, array, mode=None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **kwargs)


def _labelled(root, values, size=(6, 5)):
    """images/ + masks/, one mask per entry of ``values`` filled with it."""
    for i, value in enumerate(values):
        _save(root / "images" / f"{i:03d}.png", np.full((*size, 3), i, np.uint8))
        _save(root / "masks" / f"{i:03d}.png", np.full(size, value, np.uint8))


# ----------------------------------------------------------------------
# klseg.data.images: one list of suffixes, one reader
# ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix", [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"]
)
def test_every_listed_suffix_is_listed_and_read(tmp_path, suffix):
    from klseg.data.images import IMAGE_SUFFIXES, list_images, read_image

    assert suffix in IMAGE_SUFFIXES
    image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), np.uint8)
    kwargs = {"lossless": True} if suffix == ".webp" else {}
    _save(tmp_path / f"a{suffix.upper()}", image, **kwargs)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"")
    paths = list_images(tmp_path)
    assert [p.name for p in paths] == [f"a{suffix.upper()}"]
    decoded = read_image(paths[0])
    assert decoded.shape == (7, 9, 3) and decoded.dtype == np.uint8
    if suffix not in (".jpg", ".jpeg"):
        np.testing.assert_array_equal(decoded, image)


def test_list_images_prefers_images_subfolder_and_sorts(tmp_path):
    from klseg.data.images import list_images

    for name in ("b.png", "a.jpg", "c.bmp"):
        _save(tmp_path / "images" / name, np.zeros((2, 2, 3), np.uint8))
    _save(tmp_path / "stray.png", np.zeros((2, 2, 3), np.uint8))
    paths = list_images(tmp_path)
    assert [p.name for p in paths] == ["a.jpg", "b.png", "c.bmp"]
    assert all(p.parent == tmp_path / "images" for p in paths)


def test_list_images_errors_name_the_folder(tmp_path):
    from klseg.data.images import list_images

    with pytest.raises(DataError, match="does not exist") as info:
        list_images(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images found") as info:
        list_images(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)
    assert ".webp" in str(info.value)  # the message lists the accepted suffixes


def test_stem_collisions_name_both_files(tmp_path):
    from klseg.data.images import check_unique_stems, list_images

    _save(tmp_path / "x.jpg", np.zeros((2, 2, 3), np.uint8))
    _save(tmp_path / "x.png", np.zeros((2, 2, 3), np.uint8))
    _save(tmp_path / "y.png", np.zeros((2, 2, 3), np.uint8))
    assert len(list_images(tmp_path)) == 3  # allowed unless asked
    with pytest.raises(DataError, match="share the stem 'x'") as info:
        list_images(tmp_path, unique_stems=True)
    assert str(tmp_path / "x.jpg") in str(info.value)
    assert str(tmp_path / "x.png") in str(info.value)
    with pytest.raises(DataError, match="x.jpg"):
        check_unique_stems(list_images(tmp_path))
    assert list(check_unique_stems([tmp_path / "x.png", tmp_path / "y.png"])) == [
        "x",
        "y",
    ]


def test_read_image_errors_name_the_file(tmp_path):
    from klseg.data.images import read_image

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot decode image") as info:
        read_image(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "gone.png")
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((3, 3), 4000, np.uint16)).save(wide)
    with pytest.raises(DataError, match="8 bits") as info:
        read_image(wide)
    assert str(wide) in str(info.value)


def test_grey_rgba_and_palette_images_become_rgb(tmp_path):
    from klseg.data.images import read_image

    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    _save(tmp_path / "g.png", grey)
    np.testing.assert_array_equal(
        read_image(tmp_path / "g.png"), np.stack([grey] * 3, -1)
    )
    rgba = np.random.default_rng(1).integers(0, 256, (3, 4, 4), np.uint8)
    _save(tmp_path / "a.png", rgba)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])


# ----------------------------------------------------------------------
# Split.check_labels
# ----------------------------------------------------------------------


def test_check_labels_names_the_first_three_files_and_their_values(tmp_path):
    from klseg.data import load_split

    root = tmp_path / "d"
    _labelled(root, [0, 9, 1, 5, 7, 8, 2])
    split = load_split(root)
    assert split.num_classes_seen == 10
    split.check_labels(10)  # every value is below 10
    with pytest.raises(DataError) as info:
        split.check_labels(3, what="val_data")
    message = str(info.value)
    assert message.startswith(f"val_data {root}: mask values [9] in ")
    for index, value in ((1, 9), (3, 5), (4, 7)):
        assert f"[{value}] in {root / 'masks' / f'{index:03d}.png'}" in message
    assert "008.png" not in message and "005.png" not in message
    assert "and 1 more" in message and "num_classes=3" in message
    assert "ignore value 255" in message


def test_check_labels_ignores_the_ignore_value_and_unlabelled_splits(tmp_path):
    from klseg.data import Split, load_split

    root = tmp_path / "d"
    _labelled(root, [0, 255, 1])
    load_split(root).check_labels(2)
    with pytest.raises(DataError, match=r"\[1\] in"):
        load_split(root).check_labels(1)
    images = np.zeros((2, 3, 3, 3), np.uint8)
    Split.from_arrays(images).check_labels(1)  # nothing to check


def test_check_labels_arrays_name_the_split_and_index():
    from klseg.data import Split

    masks = np.zeros((5, 3, 3), np.int64)
    masks[2, 0, 0] = 4
    masks[4, 1, 1] = 6
    split = Split.from_arrays(np.zeros((5, 3, 3, 3), np.uint8), masks, name="mine")
    with pytest.raises(DataError) as info:
        split.check_labels(3, what="source_val_data")
    message = str(info.value)
    assert message.startswith("source_val_data mine: mask values [4] in example 2")
    assert "[6] in example 4" in message and "more" not in message
    with pytest.raises(DataError, match=r"values \[6\] in example 4 are"):
        split.check_labels(5)
    split.check_labels(7)


# ----------------------------------------------------------------------
# Sources behind one interface
# ----------------------------------------------------------------------


def test_each_source_reads_raw_values_and_the_split_maps_them(tmp_path):
    from klseg.data import Split, load_split
    from klseg.data.folder import FolderSource
    from klseg.data.sources import ArraySource, Source

    root = tmp_path / "d"
    _labelled(root, [7, 0])
    folder = load_split(root, class_map={0: 0, 7: 1})
    arrays = Split.from_arrays(
        np.zeros((2, 6, 5, 3), np.uint8), np.full((2, 6, 5), 1, np.uint8)
    )
    assert isinstance(folder.source, FolderSource) and folder.kind == "folder"
    assert isinstance(arrays.source, ArraySource) and arrays.kind == "arrays"
    for split in (folder, arrays):
        assert isinstance(split.source, Source)
        assert split.source.num_images == len(split) == 2
    # the source gives raw values, the split the classes
    assert folder.source.read(0)[1][0, 0] == 7 and folder.read(0)[1][0, 0] == 1
    assert folder.source.describe(1) == str(root / "masks" / "001.png")
    assert arrays.source.describe(1) == "example 1"
    assert [int(v[0]) for _, v in folder.source.mask_values()] == [7, 0]
    assert folder.num_classes_seen == 2 and arrays.num_classes_seen == 2


def test_folder_check_labels_reads_no_file(tmp_path, monkeypatch):
    from klseg.data import folder as folder_module
    from klseg.data import load_split

    root = tmp_path / "d"
    _labelled(root, [0, 4])
    split = load_split(root)

    def refuse(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(folder_module, "read_mask", refuse)
    with pytest.raises(DataError, match=r"\[4\] in .*001.png"):
        split.check_labels(4)
    split.check_labels(5)


def test_class_map_bounds_the_values_without_reading(tmp_path):
    from klseg.data import load_split

    root = tmp_path / "d"
    _labelled(root, [3, 3, 9])
    split = load_split(root, class_map={3: 0, 9: 2})
    split.check_labels(3)
    with pytest.raises(DataError) as info:
        split.check_labels(2)
    message = str(info.value)
    assert f"[2] in {root / 'masks' / '002.png'}" in message
    assert "000.png" not in message  # value 3 maps to class 0


def test_class_map_gaps_name_up_to_three_files(tmp_path):
    from klseg.data import load_split

    root = tmp_path / "d"
    _labelled(root, [0, 5, 6, 7, 8])
    with pytest.raises(DataError, match="not in the class map") as info:
        load_split(root, class_map={0: 0})
    message = str(info.value)
    assert message.startswith(f"{root / 'masks' / '001.png'}: mask values [5]")
    assert "[6] in" in message and "[7] in" in message and "and 1 more" in message


def test_missing_masks_and_sizes_name_the_files(tmp_path):
    from klseg.data import load_split

    root = tmp_path / "d"
    _labelled(root, [0, 1])
    _save(root / "masks" / "001.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(DataError, match="same size") as info:
        load_split(root)
    assert str(root / "masks" / "001.png") in str(info.value)
    assert str(root / "images" / "001.png") in str(info.value)
    (root / "masks" / "001.png").unlink()
    with pytest.raises(DataError, match="1 of 2 images have no mask") as info:
        load_split(root)
    assert "images/001.png -> masks/001.png" in str(info.value)


def test_make_dataset_and_load_arrays_agree_for_every_source(tmp_path):
    from klseg.data import Split, load_arrays, load_split, make_dataset

    root = tmp_path / "d"
    _labelled(root, [0, 1, 2], size=(8, 8))
    folder = load_split(root)
    images, masks = load_arrays(folder, 8)
    arrays = Split.from_arrays(images, masks)
    for split in (folder, arrays):
        batches = list(make_dataset(split, batch_size=3, image_size=8))
        got_images, got_masks = (np.asarray(v) for v in batches[0])
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_masks, masks)
    assert [int(m[0, 0]) for m in masks] == [0, 1, 2]


def test_tfds_source_streams_and_checks_labels(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from klseg.data import Split, load_split
    from klseg.data.tfds_source import TfdsSource

    with tfds.testing.mock_data(num_examples=4):
        split = load_split("tfds:oxford_iiit_pet", data_dir=tmp_path)
        assert isinstance(split.source, TfdsSource)
        assert split.num_images is None  # mock data carries no example count
        assert len(list(split.iterate_numpy())) == 4
        # the built-in map sends every value to 0, 1 or ignore: nothing to read
        split.check_labels(2)
        # the same source without a class map: mock masks hold values 0..254
        raw = Split(split.source)
        with pytest.raises(DataError) as info:
            raw.check_labels(3, what="val_data")
        message = str(info.value)
        assert message.startswith("val_data tfds:oxford_iiit_pet:train: mask values")
        assert " in example 0" in message and "num_classes=3" in message
        # reading streamed data gives masks at the image size
        for image, mask in split.iterate_numpy():
            assert mask.shape == image.shape[:2]


# ----------------------------------------------------------------------
# Layering: one import direction, no private attributes across modules
# ----------------------------------------------------------------------


def _data_modules():
    import ast
    from pathlib import Path

    import klseg.data

    folder = Path(klseg.data.__file__).parent
    modules = {}
    for path in sorted(folder.glob("*.py")):
        if path.stem != "__init__":
            modules[path.stem] = ast.parse(path.read_text(), filename=str(path))
    return modules


def _imports(tree, names):
    """``(imported data module, node)`` for every import of a sibling module."""
    import ast

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if base == "klseg.data" or (node.level == 1 and not base):
                found += [(a.name, node) for a in node.names if a.name in names]
            elif base.startswith("klseg.data."):
                found.append((base.split(".")[2], node))
            elif node.level == 1 and base in names:
                found.append((base, node))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("klseg.data."):
                    found.append((alias.name.split(".")[2], node))
    return found


def _top_level(tree):
    import ast

    return {
        id(node) for node in tree.body if isinstance(node, ast.ImportFrom | ast.Import)
    }


def _import_graph(modules):
    """``{module: {sibling it imports}}``; raises on a function-level import."""
    graph = {}
    for name, tree in modules.items():
        top = _top_level(tree)
        edges = set()
        for target, node in _imports(tree, set(modules)):
            if id(node) not in top:
                raise AssertionError(f"{name}.py imports {target} inside a function")
            edges.add(target)
        graph[name] = edges
    return graph


def _find_cycle(graph):
    """A list of modules forming an import cycle, or ``None``."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path, node, nxt]
            if nxt not in state:
                cycle = visit(nxt, [*path, node])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def _foreign_private_reads(tree, siblings):
    """Private names a module imports from, or reads on, another module's objects.

    A ``._name`` attribute counts as the module's own when the module assigns
    or defines that name; anything else is another module's private state.
    """
    import ast

    own = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            own.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
    found = []
    for _, node in _imports(tree, siblings):
        found += [a.name for a in getattr(node, "names", []) if a.name[:1] == "_"]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            attr = node.attr
            if attr.startswith("_") and not attr.startswith("__") and attr not in own:
                found.append(attr)
    return found


def test_data_modules_import_in_one_direction():
    modules = _data_modules()
    assert {"classes", "images", "sources", "split", "folder", "tfds_source"} <= set(
        modules
    )
    graph = _import_graph(modules)
    assert _find_cycle(graph) is None
    # the leaves import no sibling
    for leaf in ("classes", "images", "resize", "synthetic"):
        assert graph[leaf] == set(), leaf
    # the split does not know its concrete file or TFDS sources
    assert "folder" not in graph["split"] and "tfds_source" not in graph["split"]
    assert all("pipeline" not in graph[n] for n in graph)


def test_no_module_reads_another_modules_private_names():
    modules = _data_modules()
    for name, tree in modules.items():
        assert _foreign_private_reads(tree, set(modules)) == [], name


def test_the_layering_checks_can_fail():
    import ast

    siblings = {"split", "folder", "augment"}
    # the state before this layout: split <-> folder through a function import
    split = ast.parse("def read():\n    from klseg.data import folder\n")
    folder = ast.parse("from klseg.data.split import Split\n")
    with pytest.raises(AssertionError, match="inside a function"):
        _import_graph({"split": split, "folder": folder})
    split = ast.parse("from klseg.data import folder\n")
    cycle = _find_cycle(_import_graph({"split": split, "folder": folder}))
    assert cycle in (["folder", "split", "folder"], ["split", "folder", "split"])
    reader = ast.parse(
        "from klseg.data.augment import _size_pair\n"
        "def f(split):\n    return split._images\n"
        "class A:\n    def __init__(self):\n        self._mine = 1\n"
        "    def g(self):\n        return self._mine\n"
    )
    assert _foreign_private_reads(reader, siblings) == ["_size_pair", "_images"]


def test_import_of_the_package_and_leaves_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, klseg.data, klseg.data.images, klseg.data.classes, "
        "klseg.data.split, klseg.data.pipeline;"
        "bad = [m for m in ('tensorflow', 'keras', 'albumentations', 'cv2', 'PIL',"
        " 'tensorflow_datasets') if m in sys.modules]; print(bad);"
        "sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docstring_examples_run():
    import doctest

    from klseg.data import classes, images, split

    for module in (classes, images, split):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
