"""Every benchmark script runs end to end on tiny settings and prints its table.

The scripts are run as users run them (a subprocess, on the current Keras
backend), so an error in a code path used only on the full-size run, such as
an argument or a report line, shows here rather than on a GPU machine.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKEND = keras.backend.backend()
VARIANTS = ("klseg", "keras", "naive")


def _run(script, args, tmp_path):
    """Run ``benchmarks/SCRIPT`` with the whitespace-separated ``args``."""
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args.split()],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result.stdout


def _table_rows(text, first_cell):
    return [line for line in text.splitlines() if line.startswith(f"| {first_cell} ")]


def test_bench_losses_prints_ratios_and_agreeing_losses(tmp_path):
    out = _run("bench_losses.py", "--batches 1 --size 16 --repeats 1", tmp_path)
    assert "copy bandwidth" in out
    rows = {v: _table_rows(out, v) for v in VARIANTS}
    assert all(len(r) == 1 for r in rows.values()), out
    cells = {v: [c.strip() for c in r[0].split("|")[1:-1]] for v, r in rows.items()}
    # "vs keras" is each row's printed time over the keras row's, up to the
    # rounding of the printed cells (times to 0.05 ms, ratios to 0.005).
    keras_ms = float(cells["keras"][2])
    for v in VARIANTS:
        ratio, ms = float(cells[v][3].removesuffix("x")), float(cells[v][2])
        slack = 0.05 + 0.05 * ratio + 0.005 * keras_ms
        assert abs(ratio * keras_ms - ms) <= slack, (v, out)
    # klseg and the naive formula agree on random logits; Keras is near.
    klseg_loss, naive_loss = float(cells["klseg"][1]), float(cells["naive"][1])
    assert klseg_loss == pytest.approx(naive_loss, rel=1e-4)
    assert float(cells["keras"][1]) == pytest.approx(klseg_loss, rel=1e-2)
    assert cells["klseg"][5] != "-"  # peak memory measured


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_losses_ratios_divide_by_the_keras_row(monkeypatch, capsys):
    """The table's ratio columns, from known medians: a wrong divisor shows."""
    bench = _load_script("bench_losses.py")
    medians = {"klseg": 0.002, "keras": 0.004, "naive": 0.010}
    values = {"klseg": 1.25, "keras": 1.5, "naive": 1.75}
    # 3 logits tensors of 2*10*10*19 float32 at 22.8 MB/s: a 2.0 ms floor.
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 22.8e6)
    monkeypatch.setattr(bench, "time_variants", lambda *a: (medians, values))
    monkeypatch.setattr(
        sys,
        "argv",
        ["bench_losses.py", "--batches", "2", "--size", "10", "--no-memory"],
    )
    bench.main()
    out = capsys.readouterr().out
    assert "memory-traffic floor 2.0 ms" in out
    expected = {
        "klseg": ["klseg", "1.2500", "2.0", "0.50x", "1.0x"],
        "keras": ["keras", "1.5000", "4.0", "1.00x", "2.0x"],
        "naive": ["naive", "1.7500", "10.0", "2.50x", "5.0x"],
    }
    for v, cells in expected.items():
        (row,) = _table_rows(out, v)
        assert [c.strip() for c in row.split("|")[1:-1]] == [*cells, "-", "-"]


def test_bench_gpu_script_runs_on_this_backend(tmp_path):
    # The GPU machines run JAX: there, both policies and all devices; on
    # TensorFlow float32 on one device (the same code, half the time).
    jax = BACKEND == "jax"
    devices = "one,all" if jax else "one"
    policies = ("float32", "mixed_bfloat16") if jax else ("float32",)
    out = _run(
        "bench_gpu.py",
        "--size 32 --batch 1 --steps 1 --warmup 1 --repeats 1 --models unet "
        f"--unet-filters 4 --unet-depth 2 --devices {devices} --json gpu.json"
        + ("" if jax else " --mixed none"),
        tmp_path,
    )
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert {r["policy"] for r in results} == set(policies), out
    steps = ["consistency", "distill", "kl_finetune", "kl_stored", "train"]
    modes = len(devices.split(","))  # one device, then all (JAX)
    for policy in policies:
        found = sorted(r["step"] for r in results if r["policy"] == policy)
        assert found == sorted(steps * modes), out
    assert all(r["images_per_s"] > 0 for r in results)
    assert all(r["ratio_vs_plain"] > 0 for r in results if r["step"] != "train")


def test_bench_models_script_runs(tmp_path):
    out = _run(
        "bench_models.py",
        "--models unet-tiny --size 32 --batch 1 --steps 1 --warmup 1 "
        "--json models.json",
        tmp_path,
    )
    results = json.loads((tmp_path / "models.json").read_text())
    assert results, out


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.data pipeline")
def test_bench_data_throughput_script_runs(tmp_path):
    out = _run(
        "bench_data.py",
        "throughput --size 32 --batch 2 --images 4 --batches 2 "
        "--warmup-batches 1 --train-steps 1 --repeats 1",
        tmp_path,
    )
    assert "light" in out


def test_bench_finetune_overhead_script_runs(tmp_path):
    out = _run(
        "bench_finetune.py",
        "overhead --size 32 --batch 1 --base-filters 4 --depth 2 --rounds 1 --steps 1",
        tmp_path,
    )
    assert "stored" in out and "live" in out
    # auto decides with the run's own function and is timed like the others.
    assert "auto (200 training images): stored, because 200 images x 32x32" in out
    rows = [
        line.split()
        for line in out.splitlines()
        if line.startswith("auto ") and not line.startswith("auto (")
    ]
    assert len(rows) == 1 and float(rows[0][2]) > 0  # median ms, ratio


def test_bench_tiled_script_prints_every_mode(tmp_path):
    # --steps 0 scores the untrained model: the table, not the training, is
    # under test. A tile as large as the image is one window, so the tiled
    # rows must repeat the whole-image scores exactly, and flip must double
    # the windows.
    out = _run(
        "bench_tiled.py",
        "--size 32 --crop 16 --tile 32 --train-images 2 --val-images 2 --steps 0 "
        "--base-filters 4 --depth 2 --augment none --json tiled.json",
        tmp_path,
    )
    assert len(_table_rows(out, "whole (baseline)")) == 1, out
    assert len(_table_rows(out, "tiled")) == 3, out
    results = json.loads((tmp_path / "tiled.json").read_text())["results"]
    modes = [(r["mode"], r["overlap"], r["tta"]) for r in results]
    assert modes == [
        ("whole", 0.0, "none"),
        ("whole", 0.0, "flip"),
        ("tiled", 0.0, "none"),
        ("tiled", 0.5, "none"),
        ("tiled", 0.5, "flip"),
    ]
    whole, whole_flip, *tiled, tiled_flip = results
    for row in tiled:
        assert row["windows_per_image"] == 1
        assert row["mean_iou"] == whole["mean_iou"]
        assert row["pixel_accuracy"] == whole["pixel_accuracy"]
    assert tiled_flip["windows_per_image"] == 2
    assert tiled_flip["mean_iou"] == whole_flip["mean_iou"]
    assert whole["time_vs_whole"] == 1.0
    assert all(r["s_per_image"] > 0 for r in results)


def test_bench_distill_script_prints_every_model(tmp_path):
    # An untrained tiny teacher (--teacher-epochs 0): the table, not the
    # training, is under test.
    out = _run(
        "bench_distill.py",
        "--size 16 --teacher unet-4 --teacher-images 4 --teacher-epochs 0 "
        "--student-filters 2 --student-depth 2 --labelled 2 --unlabelled 2 "
        "--val 2 --epochs 1 --batch 2 --repeats 1 --json distill.json",
        tmp_path,
    )
    results = json.loads((tmp_path / "distill.json").read_text())["results"]
    assert list(results) == ["teacher", "plain", "pixel", "channel"], out
    assert results["teacher"]["parameters"] > results["plain"]["parameters"]
    assert all(r["images_per_second"] > 0 for r in results.values())
    assert all(0 <= r["mean_iou"] <= 1 for r in results.values())
    for name in ("teacher (unet-4)", "plain", "pixel", "channel"):
        assert len(_table_rows(out, name)) == 1, out


def test_bench_fewlabel_script_prints_every_row(tmp_path):
    out = _run(
        "bench_fewlabel.py",
        "--size 32 --base-filters 4 --depth 2 --source-images 8 --source-epochs 1 "
        "--labels 8 --unlabelled 6 --source-unlabelled 6 --val 4 --steps 2 "
        "--batch 2 --seeds 0 --json runs.json",
        tmp_path,
    )
    rows = [line for line in out.splitlines() if line.startswith("| 8 ")]
    # plain, KL, and the consistency run's EMA teacher and student.
    assert len(rows) == 4 and "EMA teacher" in rows[2] and "student" in rows[3]
    assert "8 labels + consistency (EMA teacher): target" in out
    saved = json.loads((tmp_path / "runs.json").read_text())
    assert len(saved["runs"]) == 3  # one per variant
    mt = [r for r in saved["runs"] if r["variant"] == "mt"]
    assert all(0 <= r["ema"]["target_mean_iou"] <= 1 for r in mt)


def test_bench_adapt_script_prints_every_row(tmp_path):
    out = _run(
        "bench_adapt.py",
        "--size 32 --base-filters 4 --depth 2 --source-images 8 --source-epochs 1 "
        "--unlabelled 6 --val 4 --steps 2 --batch 2 --seeds 0 --json runs.json",
        tmp_path,
    )
    rows = [line for line in out.splitlines() if line.startswith("| 0 ")]
    # The source model, AdaBN, TENT, then every self-training row twice (EMA
    # teacher, student).
    assert len(rows) == 3 + 2 * 6, out
    assert "source colours randomised, EMA teacher" in out
    assert len(_table_rows(out, "48")) == 1
    assert "(1) UDA (uda, EMA teacher): target" in out
    assert "(2) source-free (sf, EMA teacher): target" in out
    saved = json.loads((tmp_path / "runs.json").read_text())
    assert {r["variant"] for r in saved["runs"]} >= {"adabn", "tent", "uda", "sf"}
