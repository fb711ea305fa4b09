"""Every training job under ``--strategy multi-worker`` with two local worker
processes (loopback ports), against the same job on one device.

In one cluster worker 1 is killed (SIGKILL) inside the second epoch of a
training run, and the chief stops with a message; a second cluster resumes
the run, then runs every other job in the same two processes
(tests/multi_worker_check.py), and fits a model with plain Keras to record
how Keras fails without klseg's workaround. The one-device runs happen in
this process. Each job's history (every logged loss and score) and its
model's weights equal the one-device run's within the tolerances of the
mirrored tests (tests/test_distribute.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import (
    assert_history_close,
    free_ports,
    history_epochs,
    train_config,
)
from multi_worker_check import JOBS, config

from klseg import errors, runs
from klseg.runs import fit, runtime

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="MultiWorkerMirroredStrategy needs the TensorFlow backend",
)

CHECK = Path(__file__).with_name("multi_worker_check.py")


def _two_workers(root, *steps):
    """Run ``multi_worker_check.py ROOT STEPS`` as workers 0 and 1 of one
    cluster; ``[(exit code, output, own temporary folder)]`` per worker."""
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs, temps = [], []
    for index in range(2):
        temp = root / f"tmp_{steps[0].replace(':', '_')}_{index}"
        temp.mkdir()
        tf_config = {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": index},
        }
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps(tf_config),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "NO_ALBUMENTATIONS_UPDATE": "1",
            "TMPDIR": str(temp),
            "PYTHONPATH": str(CHECK.parent),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(CHECK), str(root), *steps],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        temps.append(temp)
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, text, t) for p, text, t in zip(procs, outputs, temps)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The two clusters' results and the one-device runs, in ``root``."""
    from klseg.data import synthetic

    root = tmp_path_factory.mktemp("multi_worker")
    bench = synthetic.write_benchmark(
        root / "bench", image_size=32, num_train=8, num_val=4, num_unlabeled=8,
        num_target_train=8,
    )  # fmt: skip
    source = runs.train(train_config(bench, root / "source"))
    os.link(source.model_path, root / "source.keras")
    killed = _two_workers(root, "train:die")
    after_kill = sorted(p.name for p in (root / "train_multi-worker").iterdir())
    checkpoints = root / "train_multi-worker" / "checkpoints"
    checkpoints_after_kill = sorted(p.name for p in checkpoints.iterdir())
    resumed = _two_workers(root, "train:resume", *JOBS[1:], "keras")
    for rc, text, _ in resumed:
        assert rc == 0, text[-4000:]
    for job in JOBS:
        run, cfg = config(job, "default", root)
        run(cfg)
    found = json.loads(resumed[0][1].strip().splitlines()[-1])
    return {
        "root": root,
        "killed": killed,
        "after_kill": after_kill,
        "checkpoints_after_kill": checkpoints_after_kill,
        "resumed": resumed,
        "keras": found["keras"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("job", JOBS)
def test_two_workers_equal_one_device(cluster, job):
    """History and weights of the two-worker run = the one-device run's
    (``train`` was killed after its first epoch and resumed)."""
    root = cluster["root"]
    two, one = root / f"{job}_multi-worker", root / f"{job}_default"
    columns = assert_history_close(two / "history.csv", one / "history.csv")
    assert list(columns["epoch"]) == [0, 1]
    # Adam moves a parameter with a near-zero gradient by up to the learning
    # rate whatever its rounding (as in the mirrored tests).
    ours, theirs = _weights(two / "model.keras"), _weights(one / "model.keras")
    assert len(ours) == len(theirs)
    for x, y in zip(ours, theirs):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    assert json.loads((two / "metrics.json").read_text())["epochs"] == 2


@pytest.mark.slow
def test_a_lost_worker_stops_the_run_and_it_resumes(cluster):
    """Worker 1 killed inside the second epoch: the chief stops (exit 1)
    naming it and what to do, keeps the checkpoint of epoch 1 and writes no
    metrics; resumed, every worker restored that checkpoint (the run equals
    one device's, above), and the workers that ended left nothing in their
    own temporary folders."""
    (chief_rc, chief_out, _), (rc, text, temp) = cluster["killed"]
    assert rc == -9, text[-3000:]
    assert chief_rc == 1, chief_out[-3000:]
    assert "worker 1 of this multi-worker run stopped during training" in chief_out
    assert "--resume" in chief_out
    assert "metrics.json" not in cluster["after_kill"]
    assert "checkpoints" in cluster["after_kill"]
    assert cluster["checkpoints_after_kill"] == ["epoch_0001", "latest.json"]
    root = cluster["root"]
    assert history_epochs(root / "train_multi-worker" / "history.csv") == [0, 1]
    # A killed worker cannot clean up its temporary folder; the workers that
    # ended removed theirs.
    assert list(temp.glob("klseg-worker-*/model.keras"))
    for _, _, temp in cluster["resumed"]:
        assert not list(temp.glob("klseg-worker-*")), temp
    # Both said where they resume; worker 1's private folder had no history
    # to rebuild worth saying.
    chief_said, worker_said = (text for _, text, _ in cluster["resumed"])
    resuming = f"Resuming {root / 'train_multi-worker'} after epoch 1."
    assert resuming in chief_said and resuming in worker_said
    assert "Rebuilt" not in chief_said + worker_said
    runs_written = [f"{job}_{s}" for job in JOBS for s in ("default", "multi-worker")]
    assert sorted(p.parent.name for p in root.glob("*/model.keras")) == sorted(
        ["source", *runs_written]
    )


@pytest.mark.slow
def test_keras_still_needs_the_multi_worker_workaround(cluster):
    """Keras 3 ``fit`` under MultiWorkerMirroredStrategy fails on its own in
    the two ways ``runtime.multi_worker_fit_fixes`` works around. When this
    test fails, Keras fixed them: remove the workaround (and this test)."""
    plain, built = cluster["keras"]
    assert plain is not None and "PerReplica" in plain, plain
    assert built is not None and "Invalid reduction dimension" in built, built


def _weights(path):
    return runs.load_model(path).get_weights()


class _Cluster:
    """A stand-in for a two-worker strategy: ``gather_from_workers`` is
    replaced by the rows the test gives."""


def _agree(monkeypatch, rows, start, chief):
    monkeypatch.setattr(runtime, "gather_from_workers", lambda strategy, values: rows)
    cfg = runs.TrainConfig(data="d", val_data="v", output="/shared/run")
    return fit._workers_agree(_Cluster(), cfg, start, chief=chief)


def test_workers_that_would_start_apart_stop_before_training(monkeypatch):
    start = (("epoch_0003", {"epoch": 3}), None)
    # Everyone at epoch 3: nothing to say.
    assert _agree(monkeypatch, [(1, 3, 0, 1), (1, 3, 0, 0)], start, False) is None
    # A worker that cannot see the chief's folder starts from scratch.
    with pytest.raises(errors.RunError) as e:
        _agree(monkeypatch, [(1, 3, 0, 1), (1, 0, 0, 0)], (None, None), False)
    text = str(e.value)
    assert "the chief from 3, this worker from none" in text
    assert "/shared/run" in text and "shares" in text
    # The chief finished the run, the worker would train: they disagree too.
    with pytest.raises(errors.RunError, match="different"):
        _agree(monkeypatch, [(1, 3, 1, 1), (1, 3, 0, 0)], start, False)
    # The chief failed to open the run: the worker stops and points to it;
    # the chief keeps its own error (nothing raised here).
    with pytest.raises(errors.RunError, match="the chief of this multi-worker run"):
        _agree(monkeypatch, [(0, 0, 0, 1), (1, 0, 0, 0)], (None, None), False)
    assert _agree(monkeypatch, [(0, 0, 0, 1), (1, 0, 0, 0)], None, True) is None
    with pytest.raises(errors.RunError, match="a worker of this"):
        _agree(monkeypatch, [(1, 0, 0, 1), (0, 0, 0, 0)], (None, None), True)


def test_a_process_joins_one_cluster(monkeypatch):
    """A later multi-worker job of the process reuses the cluster it joined
    (TensorFlow holds this task's port); another TF_CONFIG is refused, naming
    both clusters."""
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    joined = object()
    monkeypatch.setattr(
        runtime, "_multi_worker", ((cluster, "worker", 1), (joined, False))
    )
    config = {"cluster": cluster, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert runtime.make_strategy("multi-worker") == (joined, False)
    config["task"]["index"] = 0
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    with pytest.raises(errors.InvalidArgumentError) as e:
        runtime.make_strategy("multi-worker")
    text = str(e.value)
    assert "already joined" in text and "worker 1" in text
    assert '"index": 0' in text and "new process" in text


def test_a_lost_peer_is_told_apart_from_other_errors():
    """TensorFlow's message when a peer stops sending heartbeats (as seen
    with two local workers) names the task; other errors are not a lost
    peer."""

    class UnavailableError(Exception):
        pass

    seen = (
        "Graph execution error:\n\nCollective ops is aborted by: Error reported "
        "from /job:worker/task:1: The following tasks are unhealthy (stopped "
        "sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have "
        "crashed."
    )
    assert runtime.lost_peers(UnavailableError(seen)) == "worker 1"
    assert runtime.lost_peers(UnavailableError("Collective ops is aborted")) == (
        "a worker"
    )
    assert runtime.lost_peers(UnavailableError("socket closed")) is None
    assert runtime.lost_peers(ValueError(seen)) is None
