"""Shared pytest fixtures: a seeded random generator and backend gradients."""

import keras
import numpy as np
import pytest


@pytest.fixture
def rng():
    """A NumPy generator with a fixed seed."""
    return np.random.default_rng(0)


def _value_and_grad_tensorflow(fn, *args, argnum=0):
    import tensorflow as tf

    args = [tf.constant(np.asarray(a)) for a in args]
    with tf.GradientTape() as tape:
        tape.watch(args[argnum])
        value = fn(*args)
    grad = tape.gradient(value, args[argnum])
    return float(value), np.asarray(grad)


def _value_and_grad_jax(fn, *args, argnum=0):
    import jax

    args = [jax.numpy.asarray(np.asarray(a)) for a in args]
    value, grad = jax.value_and_grad(fn, argnums=argnum)(*args)
    return float(value), np.asarray(grad)


@pytest.fixture
def value_and_grad():
    """``value_and_grad(fn, *arrays, argnum=0) -> (float value, numpy grad)``.

    Uses ``tf.GradientTape`` on the TensorFlow backend and ``jax.grad`` on
    JAX; other backends skip the test.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _value_and_grad_tensorflow
    if backend == "jax":
        return _value_and_grad_jax
    pytest.skip(f"gradient tests run on TensorFlow and JAX, not on {backend}")
