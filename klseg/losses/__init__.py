"""Per-pixel divergences for semantic segmentation.

The functions compute per-pixel values (the input shape without the class
axis) in float32 from logits through ``log_softmax``; the ``Loss`` classes
wrap them, store every argument in ``get_config`` and mark ignored pixels
with a Keras mask, so Keras' default ``"sum_over_batch_size"`` reduction
gives the **mean over non-ignored pixels** (weighted by ``sample_weight``
as in Keras). A batch in which every pixel is ignored gives 0 and a zero
gradient.

All results and gradients are finite for finite inputs, including logits
of +-1e4 (``keras.losses.KLDivergence`` clips probabilities at 1e-7 and
saturates near 16.1 there) and targets containing exact zeros.

Conventions shared by every function here:

- ``y_pred`` is logits when ``from_logits=True`` (the default: klseg models
  output logits), otherwise probabilities.
- ``target`` says what ``y_true`` holds: ``"probabilities"`` (soft labels,
  one-hot maps), ``"logits"`` (a teacher's raw outputs) or
  ``"log_probabilities"``.
- A zero probability has no finite logarithm; klseg uses ``log(0) =
  log(1.18e-38) = -87.34`` (see ``klseg.ops.safe_log``). For a target this
  is exact (``0 * log 0 = 0``); for a prediction of exactly 0 where the
  target has mass, the divergence (truly infinite) is reported as about
  87.3 nats per unit of target mass, with zero gradient through that entry.
- A target row that sums to 0 (``target="probabilities"``, e.g. the one-hot
  encoding of the ignore label 255) or is all ``-inf``
  (``"log_probabilities"``) means "no target": its value is 0. The loss
  classes exclude such pixels from the mean when ``ignore_class`` is set.
- Probability inputs at temperature 1 are used as given, not renormalised.
  When their values can be read (eager calls), negative entries and rows
  whose sum is not 1 (within 1e-2) or 0 raise ``ValueError``; inside a
  compiled ``fit`` step they are not checked.

Where each part lives:

- ``divergences``: the per-pixel functions ``kl_divergence``,
  ``jensen_shannon_divergence``, ``sparse_kl_divergence``.
- ``pixel_losses``: their ``Loss`` classes ``KLDivergence``,
  ``JensenShannonDivergence``, ``SparseKLDivergence``.
- ``weighted_sum``: ``WeightedSum``, a weighted sum of any Keras losses.
- ``channel_wise``: ``channel_wise_kl_divergence`` and
  ``ChannelWiseKLDivergence`` (per image and channel, not per pixel).
- ``base``: ``DivergenceLoss``, the base of the classes (a thin wrapper over
  a function, as ``keras.losses.LossFunctionWrapper``).
- ``checks``: the argument and input checks they share.

Every public name is importable from ``klseg.losses`` itself.
"""

from klseg.losses.channel_wise import (
    ChannelWiseKLDivergence,
    channel_wise_kl_divergence,
)
from klseg.losses.divergences import (
    jensen_shannon_divergence,
    kl_divergence,
    sparse_kl_divergence,
)
from klseg.losses.pixel_losses import (
    JensenShannonDivergence,
    KLDivergence,
    SparseKLDivergence,
)
from klseg.losses.weighted_sum import WeightedSum

__all__ = [
    "kl_divergence",
    "sparse_kl_divergence",
    "jensen_shannon_divergence",
    "KLDivergence",
    "SparseKLDivergence",
    "JensenShannonDivergence",
    "WeightedSum",
    "channel_wise_kl_divergence",
    "ChannelWiseKLDivergence",
]

# ``doctest.testmod(klseg.losses)`` runs the examples of the names defined in
# the modules above (run with this namespace as globals).
__test__ = {name: globals()[name] for name in __all__}
