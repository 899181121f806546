"""The command-line tools on real MNIST with tiny iteration counts: nets.train (incl. checkpoint/resume
and Ctrl-C), nets.compare_optimizers, nets.gradcheck, and examples/himmelblau.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from nets import compare_optimizers, gradcheck, train
from nets.data import load_mnist
from tests.conftest import assert_by_rows

REPO = Path(__file__).resolve().parent.parent
EPOCH_LINE = re.compile(r"^train acc, test acc \| (0\.\d+|1\.0), (0\.\d+|1\.0)$")


def run_train(capsys, *args, on_iteration=None):
    """main(args) in-process; returns (exit code, stdout, stderr)."""
    code = train.main([str(a) for a in args], on_iteration=on_iteration)
    out, err = capsys.readouterr()
    return code, out, err


def epoch_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("train acc")]


def saved_run(out_dir: Path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(out_dir / "checkpoint.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    curves = json.loads((out_dir / "curves.json").read_text())
    return arrays, curves


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical params, optimizer state, RNG state and curves (wall time aside)."""
    arrays_a, curves_a = saved_run(a)
    arrays_b, curves_b = saved_run(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    for key in arrays_a:
        if key != "curves":  # its wall time differs; curves.json is compared below
            np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)
    for curves in (curves_a, curves_b):
        curves.pop("wall_time_s")
    assert curves_a == curves_b


def test_seed000_defaults_print_epoch_lines_and_write_outputs(capsys, mnist_dir, tmp_path):
    code, out, _ = run_train(capsys, "--iters", 30, "--no-progress", "--out", tmp_path, "--data-dir", mnist_dir)
    assert code == 0
    lines = epoch_lines(out)
    assert len(lines) == 1 and EPOCH_LINE.match(lines[0]), out  # iteration 0 only: an epoch is 600 iterations
    assert "30 iterations in" in out
    _, curves = saved_run(tmp_path)
    assert curves["config"] == {
        "preset": "seed000",
        "hidden": [50],
        "activation": "sigmoid",
        "weight_init_std": 0.01,
        "optimizer": "sgd",
        "lr": 0.1,
        "batch_size": 100,
        "iters": 30,
        "seed": 0,
        "gradient": "backprop",
        "backend": "numpy",
        "dtype": "float64",
        "input_mean": 0.0,
        "input_std": 1.0,
        "sampling": "with-replacement",
    }
    assert curves["status"] == "finished" and curves["iter_per_epoch"] == 600 and len(curves["loss"]) == 30
    assert curves["epoch_iterations"] == [0] and curves["wall_time_s"] > 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_epoch_line_per_epoch_and_a_progress_bar(capsys, mnist_dir, tmp_path):
    # batch 6000 -> an epoch is 10 iterations: lines after iterations 0, 10 and 20
    code, out, err = run_train(
        capsys, "--iters", 25, "--batch-size", 6000, "--hidden", 10, "--out", tmp_path, "--data-dir", mnist_dir
    )
    assert code == 0
    lines = epoch_lines(out)
    assert len(lines) == 3 and all(EPOCH_LINE.match(line) for line in lines)
    assert "backprop on numpy" in err and "25/25" in err  # the tqdm bar went to stderr
    _, curves = saved_run(tmp_path)
    assert curves["epoch_iterations"] == [0, 10, 20]
    assert curves["train_acc"][-1] > curves["train_acc"][0] and curves["loss"][-1] < curves["loss"][0]


def test_mlp_preset(capsys, mnist_dir, tmp_path):
    code, out, _ = run_train(
        capsys, "--preset", "mlp", "--iters", 3, "--no-progress", "--out", tmp_path, "--data-dir", mnist_dir
    )
    assert code == 0 and epoch_lines(out) == []  # accuracies after each whole epoch of 300 iterations
    arrays, curves = saved_run(tmp_path)
    assert curves["config"]["hidden"] == [200, 200] and curves["config"]["activation"] == "relu"
    assert (curves["config"]["lr"], curves["config"]["batch_size"], curves["iter_per_epoch"]) == (0.01, 200, 300)
    assert arrays["param/W3"].shape == (200, 10)


def test_mlp_preset_is_seed_003s_setting(mnist_dir):
    """Seed 003: Normalize((0.01307,), (0.3081,)) after ToTensor, kaiming_normal_ weights (defaults:
    fan_in, gain sqrt(2), so N(0, 2 / fan_in)), zero biases, SGD 0.01, batch 200, 10 shuffled epochs."""
    config = train.config_from_args(train.build_parser().parse_args(["--preset", "mlp"]))
    assert (config.hidden, config.activation, config.optimizer, config.lr) == ([200, 200], "relu", "sgd", 0.01)
    assert (config.batch_size, config.iters, config.sampling) == (200, 3000, "shuffled-epochs")
    assert (config.input_mean, config.input_std) == (0.01307, 0.3081)

    training = train.Training(config, mnist_dir)
    assert training.iter_per_epoch == 300 and config.iters // training.iter_per_epoch == 10
    (x_raw, _), (x_test_raw, _) = load_mnist(dtype="float64", data_dir=mnist_dir)
    close = partial(np.testing.assert_allclose, rtol=1e-15, atol=0)
    for got, raw in ((training.x_train, x_raw), (training.x_test, x_test_raw)):
        assert_by_rows(close, got, lambda rows, raw=raw: (raw[rows] - 0.01307) / 0.3081, raw.shape)

    for layer, fan_in in enumerate([784, 200, 200], start=1):
        weights, biases = training.net.params[f"W{layer}"], training.net.params[f"b{layer}"]
        std = np.sqrt(2 / fan_in)
        n = weights.size  # 156,800 / 40,000 / 2,000 draws: the sample std is within 5 standard errors
        assert abs(weights.mean()) < 5 * std / np.sqrt(n)
        assert abs(weights.std() / std - 1) < 5 / np.sqrt(2 * n)
        # normal, not uniform or truncated: about 68.3% within one std, 4.6% beyond two
        assert abs(np.mean(np.abs(weights) < std) - 0.6827) < 5 * np.sqrt(0.22 / n)
        assert abs(np.mean(np.abs(weights) > 2 * std) - 0.0455) < 5 * np.sqrt(0.044 / n)
        assert not biases.any()


def test_shuffled_epochs_visit_every_sample_once_per_epoch(mnist_dir):
    config = train.config_from_args(train.build_parser().parse_args(["--preset", "mlp", "--batch-size", "12000"]))
    training = train.Training(config, mnist_dir)
    assert training.iter_per_epoch == 5
    epochs = [np.concatenate([training._batch_indices(i) for i in range(e * 5, e * 5 + 5)]) for e in (0, 1)]
    for rows in epochs:
        assert rows.shape == (60000,) and np.array_equal(np.sort(rows), np.arange(60000))
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh shuffle each epoch
    again = train.Training(config, mnist_dir)  # a function of (seed, epoch): a resumed run draws the same
    np.testing.assert_array_equal(again._batch_indices(7), epochs[1][2 * 12000 : 3 * 12000])


def test_mlp_preset_prints_an_epoch_line_after_each_epoch(capsys, mnist_dir, tmp_path):
    # batch 20000: an epoch is 3 iterations, lines after iterations 2 and 5 (the seed's "after each epoch")
    code, out, _ = run_train(
        capsys, "--preset", "mlp", "--batch-size", 20000, "--iters", 7, "--hidden", "8,8", "--no-progress",
        "--out", tmp_path, "--data-dir", mnist_dir,
    )  # fmt: skip
    assert code == 0 and len(epoch_lines(out)) == 2
    _, curves = saved_run(tmp_path)
    assert curves["epoch_iterations"] == [2, 5]


@pytest.mark.parametrize("method", ["naive", "batched", "incremental"])
def test_numerical_gradient_training_follows_backprop(capsys, mnist_dir, tmp_path, method):
    common = ["--hidden", 3, "--batch-size", 2, "--iters", 2, "--no-progress", "--data-dir", mnist_dir]
    assert run_train(capsys, *common, "--out", tmp_path / "backprop")[0] == 0
    assert run_train(capsys, *common, "--gradient", method, "--out", tmp_path / method)[0] == 0
    reference, _ = saved_run(tmp_path / "backprop")
    numeric, curves = saved_run(tmp_path / method)
    assert curves["config"]["gradient"] == method
    for name in ("W1", "b1", "W2", "b2"):
        # two SGD steps of lr 0.1 with gradients that agree to ~1e-10
        np.testing.assert_allclose(numeric[f"param/{name}"], reference[f"param/{name}"], rtol=0, atol=1e-10)


def test_interrupted_run_resumes_bit_identically(capsys, mnist_dir, tmp_path):
    settings = [
        "--hidden",
        20,
        "--batch-size",
        1000,
        "--iters",
        70,
        "--optimizer",
        "adam",
        "--lr",
        0.001,
        "--no-progress",
        "--data-dir",
        mnist_dir,
    ]  # an epoch is 60 iterations; Adam has state
    assert run_train(capsys, *settings, "--out", tmp_path / "straight")[0] == 0

    periodic = []

    def interrupt(i):
        if i == 25:
            with np.load(tmp_path / "stopped" / "checkpoint.npz") as npz:
                periodic.append(int(npz["iteration"]))
        if i == 33:
            raise KeyboardInterrupt

    code, _, err = run_train(
        capsys, *settings, "--checkpoint-every", 10, "--out", tmp_path / "stopped", on_iteration=interrupt
    )
    checkpoint = tmp_path / "stopped" / "checkpoint.npz"
    assert code == 130
    assert (
        "interrupted at iteration 33 of 70" in err and f"resume with: python -m nets.train --resume {checkpoint}" in err
    )
    assert periodic == [20]
    arrays, curves = saved_run(tmp_path / "stopped")
    assert int(arrays["iteration"]) == 33 and len(curves["loss"]) == 33 and curves["status"] == "interrupted"

    code, out, err = run_train(capsys, "--resume", checkpoint, "--no-progress", "--data-dir", mnist_dir)
    assert code == 0 and "resuming" in err and len(epoch_lines(out)) == 1  # the line of iteration 60
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")


def test_ctrl_c_in_a_real_process(capsys, mnist_dir, tmp_path):
    settings = ["--hidden", 5, "--batch-size", 10, "--iters", 6000, "--no-progress", "--data-dir", mnist_dir]
    out_dir = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nets.train", *map(str, settings), "--out", str(out_dir)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.readline()  # the line of iteration 0: training is under way
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert EPOCH_LINE.match(first.strip()), first
    assert proc.returncode == 130, err
    assert "resume with: python -m nets.train --resume" in err and "Traceback" not in err
    arrays, curves = saved_run(out_dir)
    stopped_at = int(arrays["iteration"])
    assert 0 < stopped_at < 6000 and len(curves["loss"]) == stopped_at

    assert run_train(capsys, "--resume", out_dir / "checkpoint.npz", "--no-progress", "--data-dir", mnist_dir)[0] == 0
    assert run_train(capsys, *settings, "--out", tmp_path / "straight")[0] == 0
    assert_same_run(tmp_path / "straight", out_dir)


def test_resume_keeps_the_experiment_settings(capsys, mnist_dir, tmp_path):
    assert (
        run_train(capsys, "--hidden", 4, "--iters", 3, "--no-progress", "--out", tmp_path, "--data-dir", mnist_dir)[0]
        == 0
    )
    checkpoint = tmp_path / "checkpoint.npz"
    code, _, err = run_train(capsys, "--resume", checkpoint, "--lr", 0.5, "--hidden", 4)
    assert code == 2 and "drop --lr 0.5 (the run used 0.1)" in err
    code, _, err = run_train(capsys, "--resume", checkpoint, "--iters", 2)
    assert code == 2 and "at iteration 3; --iters 2 is already done" in err
    code, out, _ = run_train(
        capsys,
        "--resume",
        checkpoint,
        "--iters",
        5,
        "--gradient",
        "incremental",
        "--no-progress",
        "--data-dir",
        mnist_dir,
    )
    assert code == 0 and "5 iterations in" in out
    _, curves = saved_run(tmp_path)
    assert curves["config"]["gradient"] == "incremental" and len(curves["loss"]) == 5
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint")
    code, _, err = run_train(capsys, "--resume", tmp_path / "junk.npz")
    assert code == 2 and "cannot read checkpoint" in err


def test_bad_settings_are_errors(capsys, mnist_dir, tmp_path):
    code, _, err = run_train(capsys, "--backend", "tpu", "--out", tmp_path)
    assert code == 2 and "unknown backend 'tpu'" in err
    code, _, err = run_train(capsys, "--hidden", "50,50", "--out", tmp_path, "--data-dir", mnist_dir)
    assert code == 2 and "use --preset mlp" in err
    code, _, err = run_train(capsys, "--lr", -1, "--out", tmp_path, "--data-dir", mnist_dir)
    assert code == 2 and "lr must be in (0, inf)" in err
    with pytest.raises(SystemExit):
        train.main(["--iters", "0"])
    assert "must be a positive integer" in capsys.readouterr().err


def test_compare_optimizers(capsys, mnist_dir, tmp_path):
    code = compare_optimizers.main(
        ["--iters", "12", "--batch-size", "32", "--no-progress", "--out", str(tmp_path), "--data-dir", str(mnist_dir)]
    )
    out = capsys.readouterr().out
    assert code == 0
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| optimizer | lr | final loss") and len(table) == 6
    assert [row.split("|")[1].strip() for row in table[1:]] == ["SGD", "Momentum", "AdaGrad", "RMSprop", "Adam"]
    saved = json.loads((tmp_path / "losses.json").read_text())
    results = saved["optimizers"]
    assert all(len(r["loss"]) == 12 for r in results.values())
    # same initial weights and same first batch: Momentum's first step is exactly SGD's
    assert results["Momentum"]["loss"][0] == results["SGD"]["loss"][0]
    assert results["SGD"]["loss"][1] != results["Momentum"]["loss"][1]
    assert (results["Adam"]["lr"], results["AdaGrad"]["lr"]) == (0.001, 0.01)
    assert (tmp_path / "losses.png").read_bytes()[:4] == b"\x89PNG"


def test_smooth_curve():
    values = np.r_[np.zeros(20), np.ones(20)]
    smoothed = compare_optimizers.smooth_curve(values)
    assert smoothed.shape == values.shape and smoothed[0] == 0 and smoothed[-1] == pytest.approx(1, rel=1e-15)
    assert 0 < smoothed[19] < 0.5 < smoothed[20] < 1
    np.testing.assert_allclose(compare_optimizers.smooth_curve(np.full(30, 2.5)), 2.5, rtol=1e-15)


def test_gradcheck_naive_on_three_images(capsys, mnist_dir):
    code = gradcheck.main(["--data-dir", str(mnist_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    values = dict(re.findall(r"^(\w+): ([0-9.e+-]+)$", out, flags=re.MULTILINE))
    assert list(values) == ["W1", "b1", "W2", "b2"]
    assert all(float(v) <= 1e-9 for v in values.values()), values
    assert "verdict agrees: 39760 agree, 0 at a kink, 0 mismatch" in out and "OK: backprop agrees" in out
    assert "(naive numerical gradient vs backprop, 39760 parameters, batch 3, relu, numpy," in out


def test_gradcheck_fails_loudly_above_the_tolerance(capsys, mnist_dir, backend):
    code = gradcheck.main(
        ["--backend", backend.name, "--method", "incremental", "--tolerance", "1e-12", "--data-dir", str(mnist_dir)]
    )
    out, err = capsys.readouterr()
    assert code == 1 and "FAIL: b2" in err and "above the tolerance 1e-12" in err
    assert all(float(v) <= 1e-9 for v in re.findall(r"^\w+: ([0-9.e+-]+)$", out, flags=re.MULTILINE))


def test_himmelblau_example_reaches_the_minimum(capsys):
    from examples.himmelblau import himmelblau, main

    final = main()
    assert np.allclose(final, [3.0, 2.0], rtol=0, atol=1e-3), final
    assert himmelblau(final) < 1e-10
    out = capsys.readouterr().out
    assert out.startswith("step 0: x = [0.000999") and "step 18000" in out


def test_the_progress_helper(capsys):
    from nets.progress import Progress

    with Progress(False, 10, "quiet") as bar:
        assert bar.callback is None and not bar.enabled
        bar.update(3)
        bar.write("a line")
    out, err = capsys.readouterr()
    assert (out, err) == ("a line\n", "")
    with Progress(True, 10, "loud", unit="param") as bar:
        bar.callback(4)
        bar.postfix(loss="0.5")
        bar.write("above the bar")
        bar.update(6)
    out, err = capsys.readouterr()
    assert out == "above the bar\n" and "loud" in err and "10/10" in err and "param" in err
