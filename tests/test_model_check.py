"""Tests for klseg.models.check_segmentation_model, the one model check."""

import keras
import numpy as np
import pytest
from helpers import tiny_unet

from klseg import finetune, models
from klseg.errors import InvalidArgumentError, ModelError
from klseg.export import export_saved_model


def _wrapped(model, head):
    """``model`` called inside another Functional model, ``head`` on top."""
    inputs = keras.Input((None, None, 3))
    return keras.Model(inputs, head(model(inputs)))


def _probability_models():
    """(model, name of the layer that must be named) pairs."""
    unet = tiny_unet()
    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(3, 1, activation="softmax", name="probs")(inputs)
    nested = keras.Model(
        unet.input, keras.layers.Activation("softmax", name="act")(unet.output)
    )
    return [
        (keras.Model(inputs, conv), "probs"),
        (
            keras.Model(unet.input, keras.layers.Softmax(name="sm")(unet.output)),
            "sm",
        ),
        (_wrapped(tiny_unet(), keras.layers.Softmax(name="outer_sm")), "outer_sm"),
        (_wrapped(nested, keras.layers.Identity(name="copy")), "act"),
        (
            _wrapped(nested, lambda x: keras.layers.Cropping2D(0)(x)),
            "act",
        ),
        (_wrapped(tiny_unet(), lambda x: keras.ops.sigmoid(x)), "sigmoid"),
        (
            keras.Sequential(
                [
                    keras.Input((8, 8, 3)),
                    keras.layers.Conv2D(3, 1),
                    keras.layers.Softmax(name="seq_sm"),
                ]
            ),
            "seq_sm",
        ),
    ]


def test_logits_models_pass_and_give_the_class_count():
    unet = tiny_unet()
    assert models.check_segmentation_model(unet) == 3
    assert models.check_segmentation_model(_wrapped(unet, lambda x: x)) == 3
    # A softmax followed by a layer that rescales values is not an output
    # softmax; log_softmax gives logits (up to a per-pixel constant).
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Softmax()(keras.layers.Conv2D(3, 1)(inputs))
    assert (
        models.check_segmentation_model(
            keras.Model(inputs, keras.layers.Conv2D(2, 1)(x))
        )
        == 2
    )
    assert (
        models.check_segmentation_model(
            _wrapped(unet, lambda x: keras.ops.log_softmax(x))
        )
        == 3
    )
    linear = _wrapped(unet, keras.layers.Activation("linear"))
    assert models.check_segmentation_model(linear, "source") == 3


@pytest.mark.parametrize("index", range(7))
def test_probability_outputs_are_refused_naming_the_layer(index):
    model, layer = _probability_models()[index]
    with pytest.raises(
        ModelError, match=f"source model's output layer '[^']*{layer}[^']*'"
    ):
        models.check_segmentation_model(model, "source")


def test_every_entry_point_refuses_a_probability_model(tmp_path):
    student = tiny_unet(seed=1)
    probs = _wrapped(tiny_unet(seed=2), keras.layers.Softmax(name="appended"))
    with pytest.raises(ModelError, match="appended"):
        finetune.KLRegularizedModel(student, probs)
    with pytest.raises(ModelError, match="appended"):
        finetune.KLRegularizedModel(probs, student)
    images = np.zeros((1, 8, 8, 3), "uint8")
    with pytest.raises(ModelError, match="appended"):
        finetune.store_source_predictions(probs, images, verbose=0)
    with pytest.raises(ModelError, match="appended"):
        export_saved_model(probs, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_other_bad_models():
    with pytest.raises(InvalidArgumentError, match="Received: student="):
        models.check_segmentation_model("model.keras", "student")
    flat = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ModelError, match="per-pixel.*output_shape=\\(None, 2\\)"):
        models.check_segmentation_model(flat)
    inputs = [keras.Input((8, 8, 3)), keras.Input((8, 8, 3))]
    two = keras.Model(inputs, keras.layers.Add()(inputs))
    with pytest.raises(ModelError, match="2 inputs, 1 outputs"):
        models.check_segmentation_model(two)
    with pytest.raises(ModelError, match="built Functional"):
        models.check_segmentation_model(keras.Sequential([keras.layers.Dense(2)]))
