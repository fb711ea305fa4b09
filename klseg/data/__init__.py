"""Data for klseg: folder and TFDS splits, augmentation, tf.data, synthetic data.

Public API (loaded on first use, so ``import klseg.data.synthetic`` stays
numpy-only and nothing heavy is imported by ``import klseg.data``):

- ``load_split(spec, ...)`` -> ``Split`` (folder, ``"tfds:NAME[:SPLIT]"``,
  a data set in its own layout such as ``"cityscapes:PATH[:SPLIT]"``,
  arrays), checked up front;
- ``make_dataset(split_or_spec, *, batch_size, image_size, augment, ...)`` ->
  ``tf.data.Dataset`` of ``(images uint8, masks int32)``;
- ``load_arrays(split_or_spec, image_size)`` -> numpy arrays;
- ``DomainStyle`` (``klseg.data.style``): restyle images towards a domain;
- ``load_class_map`` (``klseg.data.classes``): read a class map;
- submodules ``synthetic``, ``augment``, ``style``, ``folder``,
  ``tfds_source``, ``pipeline``, ``split``, ``images`` (the one image reader),
  ``classes``, ``sources``, ``resize``, ``layouts`` (with ``layout_specs``
  and ``label_tables``: Cityscapes, GTA5, SYNTHIA, ACDC, Dark Zurich, VOC
  and ADE20K in their own folder layouts).

Modules import in one direction, leaves first: ``classes``, ``images``,
``resize``, ``synthetic``, ``label_tables``, ``layout_specs``; then
``sources``, ``augment``; ``split``; ``folder``, ``tfds_source``, ``style``;
``layouts``; ``pipeline``.
"""

import importlib

__all__ = [
    "DomainStyle",
    "Split",
    "augment",
    "classes",
    "fit_to_size",
    "folder",
    "images",
    "label_tables",
    "layout_specs",
    "layouts",
    "load_arrays",
    "load_class_map",
    "load_layout",
    "load_split",
    "make_dataset",
    "pipeline",
    "resize",
    "sources",
    "split",
    "style",
    "synthetic",
    "tfds_source",
]

_ATTRIBUTES = {
    "DomainStyle": "klseg.data.style",
    "Split": "klseg.data.split",
    "fit_to_size": "klseg.data.resize",
    "load_arrays": "klseg.data.pipeline",
    "load_class_map": "klseg.data.classes",
    "load_layout": "klseg.data.layouts",
    "load_split": "klseg.data.pipeline",
    "make_dataset": "klseg.data.pipeline",
}
_SUBMODULES = (
    "augment",
    "classes",
    "folder",
    "images",
    "label_tables",
    "layout_specs",
    "layouts",
    "pipeline",
    "resize",
    "sources",
    "split",
    "style",
    "synthetic",
    "tfds_source",
)


def __getattr__(name):
    if name in _SUBMODULES:
        module = importlib.import_module(f"klseg.data.{name}")
    elif name in _ATTRIBUTES:
        module = getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    else:
        raise AttributeError(f"module 'klseg.data' has no attribute {name!r}")
    globals()[name] = module
    return module


def __dir__():
    return sorted(__all__)
