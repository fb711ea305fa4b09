"""Shared pytest fixtures: a seeded random generator, backend gradients, the
tiny synthetic benchmark and a source model trained on it, the figures a
plot saves, a network that refuses connections and a CLI runner.

A test file tunes the module fixtures with module attributes: ``BENCH``
(``synthetic.write_benchmark`` arguments) and ``SOURCE_RUN``
(``helpers.train_config`` changes), each over the defaults below.
"""

import keras
import numpy as np
import pytest
from helpers import SIZE, train_config

# The benchmark most run tests need: 32 x 32 scenes, 8 source training
# images, 4 of each other split.
BENCH = {
    "image_size": SIZE,
    "num_train": 8,
    "num_val": 4,
    "num_unlabeled": 4,
    "num_target_train": 4,
}


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


@pytest.fixture(scope="module")
def bench(request, tmp_path_factory):
    """The synthetic two-domain benchmark, written once per test file; its
    sizes are ``BENCH`` updated with the file's own ``BENCH``."""
    from klseg.data import synthetic

    sizes = {**BENCH, **getattr(request.module, "BENCH", {})}
    return synthetic.write_benchmark(tmp_path_factory.mktemp("data") / "bench", **sizes)


@pytest.fixture(scope="module")
def source_run(request, bench, tmp_path_factory):
    """``runs.train`` of ``helpers.train_config`` (with the file's
    ``SOURCE_RUN`` changes) on ``bench``, once per test file."""
    from klseg import runs

    out = tmp_path_factory.mktemp("runs") / "source"
    changes = getattr(request.module, "SOURCE_RUN", {})
    return runs.train(train_config(bench, out, **changes))


@pytest.fixture(scope="module")
def source(source_run):
    """The ``model.keras`` of ``source_run``."""
    return source_run.model_path


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, in order (still written to disk)."""
    from klseg import report

    saved = []
    save = report._save_figure

    def keep(fig, path):
        saved.append(fig)
        return save(fig, path)

    monkeypatch.setattr(report, "_save_figure", keep)
    return saved


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("klseg tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def runner():
    """A ``click.testing.CliRunner``."""
    from click.testing import CliRunner

    return CliRunner()
