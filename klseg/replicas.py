"""The replicas of a distributed training step, seen from inside it.

A loss that divides by a count (labelled pixels, pixels with a prediction)
must divide by the count of the global batch, not of one replica's share,
or the result depends on how the pixels are spread over the replicas. These
helpers give ``compute_loss`` what it needs for that: the replica context,
the number of replicas and a sum over them.

Only the TensorFlow backend splits a step over replicas that each run
``compute_loss`` on their share of the batch; on JAX (and on one device) a
step computes on the whole batch, so there is one replica and every sum is
already global. TensorFlow is imported only on the TensorFlow backend.
"""

import keras

__all__ = ["global_sum", "num_replicas", "replica_context"]


def replica_context():
    """The ``tf.distribute`` replica context of a multi-replica step, or None.

    Only the TensorFlow backend splits a step over replicas that each run
    ``compute_loss`` on their share of the batch; on JAX a distributed step
    computes on the whole (sharded) batch, so sums are already global.

    Returns:
        The ``tf.distribute.ReplicaContext`` inside a step of a strategy with
        more than one replica; None elsewhere (one device, cross-replica
        context, other backends).
    """
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def global_sum(value):
    """Sum of ``value`` over the replicas of a ``tf.distribute`` step.

    Args:
        value: a tensor of this replica.

    Returns:
        The sum over all replicas (an all-reduce), or ``value`` itself with
        one replica.
    """
    context = replica_context()
    if context is None:
        return value
    import tensorflow as tf

    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def num_replicas():
    """Number of replicas of the current step (1 outside a multi-replica one)."""
    context = replica_context()
    return 1 if context is None else int(context.num_replicas_in_sync)
