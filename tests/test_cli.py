"""The CLI end to end on digits: attack → detect → remove → evaluate, plus exit codes on bad input."""

import json
import subprocess
import sys

import pytest

from latentguard.cli import main


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bad"
    code = main(["attack", "--data", "digits", "--attack", "badnets", "--model", "small_cnn", "--epochs", "6",
                 "--out", str(out), "--quiet", "--device", "cpu"])
    assert code == 0
    return out


def test_attack_writes_model_spec_indices_metrics(attacked):
    for name in ("model.json", "model.safetensors", "model.pt", "attack.json", "poisoned_indices.json",
                 "metrics.json"):
        assert (attacked / name).is_file(), name
    metrics = json.loads((attacked / "metrics.json").read_text())["metrics"]
    assert metrics["acc"] > 0.5 and metrics["asr"] > 0.5
    poisoned = json.loads((attacked / "poisoned_indices.json").read_text())
    assert poisoned["count"] == round(0.1 * poisoned["train_size"])


def test_detect_flags_target_and_writes_json_and_png(attacked, tmp_path):
    out = tmp_path / "det"
    assert main(["detect", "--model", str(attacked), "--clean", "digits", "--clean-fraction", "0.2",
                 "--out", str(out), "--device", "cpu"]) == 0
    det = json.loads((out / "detection.json").read_text())
    assert set(det) >= {"backdoored", "target_classes", "norms", "scores", "threshold", "seconds"}
    assert len(det["norms"]) == 10 and len(det["scores"]) == 10
    assert det["target_classes"] == [0]
    assert (out / "detection.png").stat().st_size > 1000
    assert det["extra"]["statistic"] == "both" and len(det["extra"]["pairwise_scores"]) == 10


def test_detect_statistic_option(attacked, tmp_path, capsys):
    out = tmp_path / "det"
    assert main(["detect", "--model", str(attacked), "--clean", "digits", "--clean-fraction", "0.2",
                 "--statistic", "pairwise", "--out", str(out), "--device", "cpu"]) == 0
    det = json.loads((out / "detection.json").read_text())
    assert det["extra"]["statistic"] == "pairwise" and det["norms"] != det["extra"]["class_norms"]
    assert "mean ‖s_a→k‖" in capsys.readouterr().out
    assert main(["detect", "--model", str(attacked), "--clean", "digits", "--statistic", "median",
                 "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "invalid choice: 'median'" in capsys.readouterr().err


def test_detect_noise_probe_option(attacked, tmp_path, capsys):
    out = tmp_path / "det"
    assert main(["detect", "--model", str(attacked), "--clean", "digits", "--clean-fraction", "0.2",
                 "--noise-probe", "0.1", "--smooth-probe", "0.3", "--out", str(out), "--device", "cpu"]) == 0
    det = json.loads((out / "detection.json").read_text())
    extra = det["extra"]
    assert extra["noise_probe"] == 0.1 and len(extra["probe_scores"]) == 10
    assert extra["smooth_probe"] == 0.3 and extra["smooth_grid"] == 4 and len(extra["smooth_scores"]) == 10
    assert len(extra["alignment_scores"]) == 10  # on by default
    assert det["scores"] == [max(v) for v in zip(extra["clean_scores"], extra["alignment_scores"],
                                                 extra["probe_scores"], extra["smooth_scores"], strict=True)]
    assert 0 in det["target_classes"]
    result = json.loads((out / "result.json").read_text())
    assert result["parameters"]["noise_probe"] == 0.1 and result["parameters"]["smooth_probe"] == 0.3
    out = capsys.readouterr().out
    assert "noisy" in out and "smooth" in out and "aligned" in out and "white noise of σ 0.1 and smooth noise of σ 0.3" in out
    off = tmp_path / "off"
    assert main(["detect", "--model", str(attacked), "--clean", "digits", "--clean-fraction", "0.2",
                 "--noise-probe", "0", "--smooth-probe", "0", "--no-alignment", "--out", str(off),
                 "--device", "cpu"]) == 0
    extra = json.loads((off / "detection.json").read_text())["extra"]
    assert "probe_scores" not in extra and "smooth_scores" not in extra and "alignment_scores" not in extra
    assert json.loads((off / "result.json").read_text())["parameters"]["alignment"] is False
    assert "anomaly index" in capsys.readouterr().out
    assert main(["detect", "--model", str(attacked), "--clean", "digits", "--smooth-probe", "2",
                 "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "--smooth-probe: expected a number in [0, 1]" in capsys.readouterr().err
    assert main(["detect", "--model", str(attacked), "--clean", "digits", "--noise-probe", "-1",
                 "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "--noise-probe: expected a number in [0, 1]" in capsys.readouterr().err


def test_detect_mad_floor_and_threads_options(attacked, tmp_path, capsys, monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    plain, floored = tmp_path / "plain", tmp_path / "floored"
    for out, floor in ((plain, "0"), (floored, "0.5")):
        assert main(["detect", "--model", str(attacked), "--clean", "digits", "--clean-fraction", "0.2",
                     "--noise-probe", "0", "--smooth-probe", "0", "--statistic", "class", "--mad-floor", floor,
                     "--threads", "1", "--out", str(out), "--device", "cpu"]) == 0
    assert calls == [1, 1]
    a, b = (json.loads((d / "detection.json").read_text()) for d in (plain, floored))
    assert a["extra"]["mad_floor"] == 0.0 and b["extra"]["mad_floor"] == 0.5
    assert json.loads((floored / "result.json").read_text())["parameters"]["mad_floor"] == 0.5
    # a floor wider than the spread shrinks every index by the same factor; the target still leads
    assert a["norms"] == b["norms"] and max(b["scores"]) < max(a["scores"])
    assert int(max(range(10), key=b["scores"].__getitem__)) == int(max(range(10), key=a["scores"].__getitem__))
    capsys.readouterr()
    assert main(["detect", "--model", str(attacked), "--clean", "digits", "--mad-floor", "-0.1",
                 "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "--mad-floor: expected a number in [0, 1]" in capsys.readouterr().err
    assert main(["detect", "--model", str(attacked), "--clean", "digits", "--threads", "0",
                 "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "--threads: expected a whole number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_remove_writes_new_weights_and_keeps_input(attacked, tmp_path):
    before = (attacked / "model.safetensors").read_bytes()
    out = tmp_path / "rem"
    assert main(["remove", "--model", str(attacked), "--clean", "digits", "--clean-fraction", "0.2",
                 "--out", str(out), "--param", "epochs=2", "--param", "min_steps=0", "--device", "cpu"]) == 0
    assert (attacked / "model.safetensors").read_bytes() == before
    report = json.loads((out / "report.json").read_text())
    assert report["parameters"]["params"]["epochs"] == 2
    assert report["metrics"]["target_classes"] == [0]
    for key in ("reserve_class_acc_before", "reserve_class_acc_after"):
        assert len(report["metrics"][key]) == 10 and all(0.0 <= a <= 1.0 for a in report["metrics"][key])
    ev = tmp_path / "ev"
    assert main(["evaluate", "--model", str(out), "--data", "digits", "--attack", str(attacked / "attack.json"),
                 "--out", str(ev), "--device", "cpu"]) == 0
    metrics = json.loads((ev / "evaluation.json").read_text())["metrics"]
    assert metrics["asr"] is not None and 0.0 <= metrics["asr"] <= 1.0
    assert len(metrics["class_acc"]) == 10 and min(metrics["class_acc"]) <= metrics["acc"] <= max(metrics["class_acc"])


def test_remove_takes_a_deep_layer_and_names_a_wrong_one(attacked, tmp_path, capsys):
    out = tmp_path / "deep"
    assert main(["remove", "--model", str(attacked), "--clean", "digits", "--clean-fraction", "0.2",
                 "--out", str(out), "--param", "epochs=1", "--param", "min_steps=0", "--param", "deep_layer=block3",
                 "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["parameters"]["params"]["deep_layer"] == "block3"
    capsys.readouterr()
    assert main(["remove", "--model", str(attacked), "--clean", "digits", "--clean-fraction", "0.2",
                 "--out", str(tmp_path / "x"), "--param", "deep_layer=block9", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "the model has no layer 'block9'" in err and "Traceback" not in err


def test_out_may_not_overwrite_inputs(attacked, capsys):
    code = main(["remove", "--model", str(attacked), "--clean", "digits", "--out", str(attacked), "--device", "cpu"])
    assert code == 2
    assert "would overwrite the input" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "--model", "small_cnn", "--data", "cifar10:/nonexistent/dir"], "nonexistent"),
        (["evaluate", "--model", "no_such_arch", "--data", "digits"], "no_such_arch"),
        (["attack", "--data", "digits", "--attack", "nope", "--model", "small_cnn", "--out", "x"], "unknown attack"),
        (["train", "--data", "weird:thing", "--model", "small_cnn", "--out", "x"], "weird"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "latentguard", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "x").exists()


def test_zoo_build_skip_clean_trains_the_clean_model_only_for_an_attack_that_needs_it(tmp_path, capsys):
    root = tmp_path / "zoo"
    common = ["--datasets", "digits", "--model", "small_cnn", "--width", "4", "--epochs", "1", "--root", str(root),
              "--quiet", "--device", "cpu", "--skip-clean"]
    assert main(["zoo", "build", "--attacks", "badnets", *common]) == 0
    assert (root / "digits" / "badnets" / "metrics.json").is_file()
    assert not (root / "digits" / "clean").exists()  # BadNets needs no clean model
    assert main(["zoo", "build", "--attacks", "lf", "--attack-param", "lf.n_images=20", "--attack-param", "lf.max_passes=1", *common]) == 0
    assert (root / "digits" / "clean" / "metrics.json").is_file()  # LF optimises its trigger against it
    assert (root / "digits" / "lf" / "metrics.json").is_file()


def test_zoo_build_passes_attack_params_to_the_cells_it_builds(tmp_path, capsys):
    root = tmp_path / "zoo"
    assert main(["zoo", "build", "--datasets", "digits", "--attacks", "blend", "--attack-param", "blend.alpha=0.3",
                 "--target", "3", "--model", "small_cnn", "--width", "8", "--epochs", "1", "--root", str(root), "--quiet",
                 "--device", "cpu"]) == 0
    spec = json.loads((root / "digits" / "blend" / "attack.json").read_text())
    assert spec["params"]["alpha"] == 0.3 and spec["target"] == 3
    clean = json.loads((root / "digits" / "clean" / "metrics.json").read_text())
    assert clean["parameters"]["zoo"]["attack_params"] == {"blend": {"alpha": 0.3}}
    table = (root / "zoo.md").read_text()  # the table names what was changed, on the attack's row only
    assert "| digits | blend | small_cnn w8 | 1 | 3 | alpha=0.3 |" in table
    assert "| digits | clean | small_cnn w8 | 1 | – | – |" in table
    capsys.readouterr()
    for bad, message in ((["--attack-param", "alpha=0.3"], "attack.name=value"),
                         (["--attack-param", "sig.delta=0.1"], "not in --attacks"),
                         (["--attack-param", "blend.alfa=0.3"], "unknown parameter(s) alfa"),
                         (["--attack-param", "blend.alpha=3"], "alpha"),
                         (["--target", "-1"], "--target")):
        assert main(["zoo", "build", "--datasets", "digits", "--attacks", "blend", "--root", str(root), *bad]) == 2
        assert message in capsys.readouterr().err
