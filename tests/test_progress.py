"""Progress output and the quiet start.

A long loop shows a bar on a terminal and about ten lines in a log file
(never an update per step); a short one shows nothing. TensorFlow's
CUDA-probe lines are left out of a command's start, and any other line
written to stderr while TensorFlow loads is still shown.
"""

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import train_config

from klseg import progress
from klseg.cli.entry import filter_startup_lines

VENV_BIN = Path(sys.executable).parent


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run_loop(stream, steps, seconds_per_step, **kwargs):
    clock = Clock()
    with progress.Progress(steps, "Scoring", clock=clock, stream=stream, **kwargs) as p:
        for _ in range(steps):
            clock.now += seconds_per_step
            p.update(1)
    return stream.getvalue()


def test_a_long_loop_in_a_log_file_writes_about_ten_lines():
    text = run_loop(io.StringIO(), 2000, 0.5)  # 1000 s
    lines = text.splitlines()
    assert "\r" not in text
    assert 5 <= len(lines) <= 12, lines
    assert lines[0].startswith("Scoring: ") and "left" in lines[0]
    assert lines[-1] == "Scoring: 2000/2000 batches done in 16:40."
    # The lines advance through the work in tenths.
    counts = [int(line.split(": ")[1].split("/")[0]) for line in lines[:-1]]
    assert counts == sorted(counts) and counts[-1] >= 1800


def test_a_short_loop_writes_nothing():
    assert run_loop(io.StringIO(), 50, 0.1) == ""  # 5 s, under the delay
    assert run_loop(Terminal(), 10, 0.1) == ""  # 1 s on a terminal


def test_verbose_0_writes_nothing_however_long():
    assert run_loop(io.StringIO(), 100, 10, verbose=0) == ""
    with progress.verbosity(0):
        assert run_loop(Terminal(), 100, 10) == ""
    assert run_loop(Terminal(), 100, 10) != ""  # the default is back


def test_a_terminal_gets_one_bar_redrawn_at_most_ten_times_a_second():
    text = run_loop(Terminal(), 1000, 0.01)  # 10 s
    draws = text.count("\r")
    assert 70 <= draws <= 90, draws  # 8 s after the 2 s delay, 10 per second
    assert text.endswith("\n") and text.count("\n") == 1
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("Scoring [" + "=" * 20 + "] 1000/1000 batches")


def test_a_transient_bar_clears_its_line():
    text = run_loop(Terminal(), 100, 0.1, transient=True)
    assert "\n" not in text
    assert text.endswith("\r") and text.split("\r")[-2].strip() == ""


def test_iterate_counts_each_pass_and_knows_lengths():
    log = io.StringIO()
    items = progress.iterate([1, 2, 3], label="Reading", stream=log, delay=0)
    assert len(items) == 3
    assert list(items) == [1, 2, 3] and list(items) == [1, 2, 3]
    ends = [line for line in log.getvalue().splitlines() if "done in" in line]
    assert ends == ["Reading: 3/3 batches done in 0 s."] * 2
    unknown = progress.iterate(iter(range(4)), label="x", unit="image")
    with pytest.raises(TypeError):
        len(unknown)


def test_an_unknown_total_writes_a_line_per_interval():
    clock = Clock()
    log = io.StringIO()
    p = progress.Progress(None, "Reading", unit="image", stream=log, clock=clock)
    for _ in range(600):  # 600 s, a line per minute after the delay
        clock.now += 1
        p.update(1)
    p.close()
    lines = log.getvalue().splitlines()
    assert 9 <= len(lines) <= 11, lines
    assert lines[-1] == "Reading: 600 images done in 10:00."


# --------------------------------------------------------------------------
# a training run's output in a log file


def test_a_run_logged_to_a_file_writes_one_line_per_epoch(tmp_path, capsys):
    from klseg import runs
    from klseg.data import synthetic

    bench = synthetic.write_benchmark(
        tmp_path / "bench", image_size=32, num_train=8, num_val=4, num_unlabeled=0
    )
    runs.train(train_config(bench, tmp_path / "run", epochs=3, seed=3, verbose=1))
    out, err = capsys.readouterr()
    assert "\r" not in out and "\r" not in err
    epoch_lines = [line for line in out.splitlines() if " - loss: " in line]
    assert len(epoch_lines) == 3, out
    assert len(out.splitlines()) <= 10, out


# --------------------------------------------------------------------------
# the quiet start

# Captured on a machine without a GPU (TensorFlow 2.21).
NO_GPU_START = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1795872515.813404   12496 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
E0000 00:00:1795872551.237540   12496 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
"""  # noqa: E501


def test_the_no_gpu_lines_are_left_out_and_others_kept():
    assert filter_startup_lines(NO_GPU_START) == ""
    other = "E0000 00:00:1.2 1 op_kernel.cc:1] Something real failed\n"
    assert filter_startup_lines(NO_GPU_START + other) == other
    # A failed cuInit where a driver was found is a real problem: shown.
    cuinit = NO_GPU_START.splitlines(keepends=True)[2]
    assert filter_startup_lines(cuinit) == cuinit
    # Lines are matched whole: a mention inside another message stays.
    quoted = "Could not find cuda drivers on your machine, GPU will not be used.\n"
    assert filter_startup_lines(quoted) == quoted


def _python(code, tmp_path, **env):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **env},
        timeout=300,
    )


def test_a_real_error_during_the_captured_import_is_shown(tmp_path):
    (tmp_path / "noisy.py").write_text(
        "import os\n"
        f"os.write(2, {NO_GPU_START.encode()!r})\n"
        "os.write(2, b'noisy: a real problem\\n')\n"
    )
    result = _python(
        """
        import sys
        from klseg.cli.entry import quiet_imports
        quiet_imports(names=("noisy",))
        import noisy
        print("imported", file=sys.stderr)
        """,
        tmp_path,
        PYTHONPATH=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "noisy: a real problem\nimported\n"


def test_a_command_imports_tensorflow_without_cuda_lines(tmp_path):
    result = _python(
        """
        from klseg.cli.options import prepare_runtime
        prepare_runtime()
        import tensorflow as tf
        import keras
        print(tf.constant(2).numpy() + 1)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "3\n"
    assert "cuda" not in result.stderr.lower(), result.stderr
    assert "InitializeLog" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["data", "synth", "--output", "synth", "--num-train", "2", "--num-val", "2"],
    ],
    ids=["help", "data-synth"],
)
def test_the_console_script_prints_no_cuda_line(tmp_path, args):
    result = subprocess.run(
        [str(VENV_BIN / "klseg"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "cuda" not in result.stderr.lower(), result.stderr
