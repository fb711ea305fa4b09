"""Export for serving: a SavedModel for any image size, LiteRT and ONNX files
for one size.

- ``export_saved_model`` (``klseg.export.saved_model``) writes a TensorFlow
  SavedModel that needs neither klseg nor Keras to run: a
  ``serving_default`` signature from uint8 images of any size to ``classes``
  and ``probabilities``, a ``class_names`` signature and a ``logits`` one.
  It works on the TensorFlow and the JAX backend.
- ``export_litert`` (``klseg.export.litert``, with quantisation) and
  ``export_onnx`` (``klseg.export.onnx``) write one file for a fixed image
  size (phones, ONNX Runtime): uint8 images ``(batch, height, width, 3)``
  in, the int32 class map ``(batch, height, width)`` out, with the padding
  to the size multiple and the argmax inside the graph (``serving_model``,
  ``klseg.export.serving``). They build on Keras' own
  ``model.export(format="litert" | "onnx")``; quantisation goes through the
  TFLite converter options Keras forwards. Both need the TensorFlow backend.
  ``run_litert`` runs a ``.tflite`` file.
- ``pad_to_multiple`` is the padding the exports apply, in numpy.

Every export is written atomically (beside its path, then renamed into
place), so a failure never leaves half an export behind. What the formats
share (the model and arguments they take, the atomic file write, the
message of a failed conversion) is in ``klseg.export.export_utils``.

Importing ``klseg.export`` loads neither Keras nor TensorFlow; they load
when an export runs.
"""

from klseg import registry
from klseg.export.litert import export_litert, run_litert
from klseg.export.onnx import export_onnx
from klseg.export.saved_model import export_saved_model
from klseg.export.serving import pad_to_multiple, serving_model

__all__ = [
    "FORMATS",
    "QUANTIZATIONS",
    "export_litert",
    "export_onnx",
    "export_saved_model",
    "pad_to_multiple",
    "run_litert",
    "serving_model",
]

#: What ``klseg export --format`` writes (``klseg.registry``).
FORMATS = registry.EXPORT_FORMATS

#: TFLite quantisations (``klseg.registry``).
QUANTIZATIONS = registry.QUANTIZATIONS
