"""The zoo and the benchmark grid on digits: cells resume, results are never double-counted or lost."""

import json

import numpy as np
import pytest

from latentguard import bench, zoo


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    config = zoo.ZooConfig(model="small_cnn", width=8, epochs=3, batch_size=64, reserve_fraction=0.1)
    for attack in (None, "badnets"):
        zoo.build_cell(root, "digits", "digits", attack, config, device="cpu")
    return root, config


def test_zoo_cells_are_complete_and_resumable(tiny_zoo):
    root, config = tiny_zoo
    cell = zoo.cell_dir(root, "digits", "badnets")
    for name in ("model.json", "model.safetensors", "attack.json", "poisoned_indices.json", "reserve_indices.json",
                 "metrics.json"):
        assert (cell / name).is_file(), name
    poisoned = set(json.loads((cell / "poisoned_indices.json").read_text())["indices"])
    reserve = set(json.loads((cell / "reserve_indices.json").read_text())["indices"])
    assert poisoned and reserve and not poisoned & reserve  # the defender never holds a poisoned image
    stamp = (cell / "metrics.json").stat().st_mtime_ns
    again = zoo.build_cell(root, "digits", "digits", "badnets", config, device="cpu")
    assert (cell / "metrics.json").stat().st_mtime_ns == stamp  # finished cell skipped
    assert again["metrics"]["asr"] is not None
    rows = zoo.collect(root)
    assert {r["cell"] for r in rows} == {"clean", "badnets"}
    assert "| digits | badnets |" in zoo.write_table(root).read_text()


def test_zoo_models_yields_finished_cells_with_reserve_and_model(tiny_zoo, tmp_path):
    import shutil

    from latentguard.data import load_data

    src, _ = tiny_zoo
    root = tmp_path / "zoo"
    shutil.copytree(src, root)
    a2a = shutil.copytree(root / "digits" / "badnets", root / "digits" / "badnets_a2a")  # an all-to-all cell
    rec = json.loads((a2a / "metrics.json").read_text())
    rec["parameters"]["attack"]["all_to_all"] = True
    (a2a / "metrics.json").write_text(json.dumps(rec))
    train = load_data("digits").train
    models = list(zoo.zoo_models(root, "unused"))
    assert [(m.dataset, m.name) for m in models] == [("digits", "badnets"), ("digits", "clean")]  # sorted, no a2a
    assert [m.target for m in models] == [0, None]
    for m in models:
        assert m.path == root / "digits" / m.name and m.record["metrics"]["acc"] > 0
        idx = json.loads((m.path / "reserve_indices.json").read_text())["indices"]
        assert np.array_equal(m.reserve.x, train.x[idx]) and np.array_equal(m.reserve.y, train.y[idx])
        assert not m.model.training
    assert models[0].asr is not None and models[1].spec is None and models[1].asr is None
    kept = list(zoo.zoo_models(root, "unused", clean=False, all_to_all=True))
    assert [(m.name, m.target) for m in kept] == [("badnets", 0), ("badnets_a2a", None)]
    assert [m.name for m in zoo.zoo_models(root, "unused", cells={"digits/clean"})] == ["clean"]
    # the zoo table's target column agrees with ZooModel.target (rows in path order: badnets, its a2a copy, clean)
    targets = [line.split(" | ")[4] for line in zoo.write_table(root).read_text().splitlines()
               if line.startswith("| digits |")]
    assert targets == ["0", "–", "–"]


def test_grid_resumes_without_double_counting(tiny_zoo, tmp_path):
    root, _ = tiny_zoo
    out = tmp_path / "bench"
    params = {"tac": {"epochs": 1, "smooth_probe": 0.3}}  # both probes on, so every verdict is recorded
    first = bench.run_grid(root, out, {"digits": "digits"}, ["clean", "badnets"], ["tac"], params=params,
                           device="cpu", log=lambda _m: None)
    assert len(first) == 2
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # an interrupted run leaves a torn last line: it is ignored and that cell alone is redone
    with open(out / "results.jsonl", "a") as f:
        f.write('{"key": "digits/badnets/ft", "acc"')
    assert bench.finished_keys(out) == {"digits/clean/tac", "digits/badnets/tac"}
    second = bench.run_grid(root, out, {"digits": "digits"}, ["clean", "badnets"], ["tac"], params=params,
                            device="cpu", log=lambda _m: None)
    assert second == []  # nothing re-run
    rows = bench.load_results(out)
    assert sorted(r["key"] for r in rows) == ["digits/badnets/tac", "digits/clean/tac"]
    bad = next(r for r in rows if r["attack"] == "badnets")
    assert 0.0 <= bad["der"] <= 1.0 and bad["reserve_size"] > 0
    # every verdict of TAC's detection is kept: the reported score is the largest of them
    det = bad["detection"]
    assert det["noise_probe"] > 0 and det["smooth_probe"] > 0 and det["smooth_grid"] >= 1
    assert len(det["clean_scores"]) == len(det["probe_scores"]) == len(det["smooth_scores"]) == len(det["scores"])
    assert det["scores"] == [max(v) for v in zip(det["clean_scores"], det["alignment_scores"], det["probe_scores"],
                                                 det["smooth_scores"], strict=True)]
    clean = next(r for r in rows if r["attack"] == "clean")
    assert clean["asr"] is None and "der" not in clean
    table = (out / "results.md").read_text()
    assert "## digits" in table and "| tac |" in table and "mean DER" in table
    assert (out / "results.csv").read_text().count("\n") == 3


def test_undefended_evaluation_is_computed_once_per_model(tiny_zoo, tmp_path, monkeypatch):
    root, _ = tiny_zoo
    out = tmp_path / "bench"
    import latentguard.evaluation as evaluation

    calls = []
    real = evaluation.evaluate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", counting)
    rows = bench.run_grid(root, out, {"digits": "digits"}, ["badnets"], ["tac", "shrinkpad"],
                          params={"tac": {"epochs": 1}}, device="cpu", log=lambda _m: None)
    # one undefended evaluation for the model, one after each defense
    assert len(calls) == 3 and len(rows) == 2
    assert rows[0]["acc_before"] == rows[1]["acc_before"] and rows[0]["asr_before"] == rows[1]["asr_before"]
    saved = json.loads((out / "undefended" / "digits-badnets.json").read_text())
    assert saved["evaluation"]["acc"] == rows[0]["acc_before"] and len(saved["weights_sha256"]) == 64
    # per-class ACC before and after, one entry per class, averaging (weighted by class size) to ACC
    for row in rows:
        for per, total in ((row["class_acc_before"], row["acc_before"]), (row["class_acc"], row["acc"])):
            assert len(per) == 10 and all(0.0 <= a <= 1.0 for a in per)
            assert min(per) <= total <= max(per)
    # a cache saved before per-class ACC was recorded is re-evaluated
    legacy = dict(saved, evaluation={k: v for k, v in saved["evaluation"].items() if k != "class_acc"})
    (out / "undefended" / "digits-badnets.json").write_text(json.dumps(legacy))
    (out / "results.jsonl").unlink()
    calls.clear()
    redo = bench.run_grid(root, out, {"digits": "digits"}, ["badnets"], ["shrinkpad"], device="cpu",
                          log=lambda _m: None)
    assert len(calls) == 2 and redo[0]["class_acc_before"] == rows[0]["class_acc_before"]
    # a stale cache (other weights) is not trusted
    saved["weights_sha256"] = "0" * 64
    saved["evaluation"]["acc"] = 2.0
    (out / "undefended" / "digits-badnets.json").write_text(json.dumps(saved))
    (out / "results.jsonl").unlink()
    again = bench.run_grid(root, out, {"digits": "digits"}, ["badnets"], ["shrinkpad"], device="cpu",
                           log=lambda _m: None)
    assert again[0]["acc_before"] == rows[0]["acc_before"]


def test_clean_fraction_gives_a_balanced_share_of_the_reserve(tiny_zoo, tmp_path):
    root, config = tiny_zoo
    out = tmp_path / "bench"
    rows = bench.run_grid(root, out, {"digits": "digits"}, ["badnets"], ["shrinkpad"], device="cpu",
                          clean_fraction=0.05, log=lambda _m: None)
    full = bench.run_grid(root, tmp_path / "full", {"digits": "digits"}, ["badnets"], ["shrinkpad"], device="cpu",
                          log=lambda _m: None)
    assert rows[0]["clean_fraction"] == 0.05 and "clean_fraction" not in full[0]
    assert rows[0]["reserve_size"] == pytest.approx(full[0]["reserve_size"] / 2, abs=10)  # 5 % of 10 %: half
    from latentguard.data import load_data

    train = load_data("digits").train
    reserve_idx = json.loads((zoo.cell_dir(root, "digits", "badnets") / "reserve_indices.json").read_text())["indices"]
    reserve = train.subset(reserve_idx)
    share = bench.reserve_share(reserve, len(train), 0.05, seed=0)
    counts = [int((reserve.subset(share).y == k).sum()) for k in range(10)]
    assert max(counts) - min(counts) <= 1 and len(set(share.tolist())) == len(share)
    with pytest.raises(bench.LatentGuardError, match="choose at most"):
        bench.reserve_share(reserve, len(train), 0.5)


def test_reserve_of_a_clean_label_attack_that_poisoned_a_whole_class():
    from latentguard.data import load_data

    train = load_data("digits").train
    whole_class = np.flatnonzero(train.y == 0)
    some = np.flatnonzero(train.y == 3)[:5]
    poisoned = np.concatenate([whole_class, some])
    reserve, originals = zoo.defender_reserve(train, 0.1, 0, poisoned, clean_label=True)
    assert originals == [0]
    assert (train.y[reserve] == 0).sum() > 0  # the class is served from its clean originals
    assert not set(reserve.tolist()) & set(some.tolist())  # other poisoned images still left out
    with pytest.raises(bench.LatentGuardError, match="no usable sample"):
        zoo.defender_reserve(train, 0.1, 0, poisoned, clean_label=False)  # a relabelling attack: never
    plain, none = zoo.defender_reserve(train, 0.1, 0, some, clean_label=True)
    assert none == [] and not set(plain.tolist()) & set(some.tolist())


def _record(dataset, attack, defense, acc, asr):
    return {"key": bench.cell_key(dataset, attack, defense), "dataset": dataset, "attack": attack,
            "defense": defense, "acc_before": 0.82, "asr_before": 0.946, "acc": acc, "asr": asr, "der": 0.5,
            "seconds": 1.0}


def test_cifar10_tables_put_backdoorbench_published_figures_beside_ours(tmp_path):
    recs = [_record("cifar10", "badnets", "ft", 0.814, 0.862), _record("cifar10", "badnets", "tac", 0.795, 0.092),
            _record("cifar10", "blend", "ft", 0.812, 1.0), _record("gtsrb", "badnets", "ft", 0.97, 0.5)]
    (tmp_path / bench.RESULTS).write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = bench.write_tables(tmp_path).read_text()
    cifar, gtsrb = text.split("## gtsrb")
    section = cifar.split("### Beside BackdoorBench's published figures")[1]
    assert "BackdoorBench" not in gtsrb and " · " not in gtsrb  # CIFAR-10 only
    lines = {line.split(" | ")[0]: line for line in section.splitlines() if line.startswith("| ")}
    # published: FT on BadNets 89.96 / 1.48, on Blended 92.78 / 96.11; undefended BadNets 91.3 / 95.0
    assert lines["| ft"] == "| ft | 81.4 / 86.2 · 90.0 / 1.5 | 81.2 / 100.0 · 92.8 / 96.1 |"
    assert "82.0 / 94.6 · 91.3 / 95.0" in lines["| no defense"]
    assert "| tac" not in lines  # no published figure for TAC: no row


def test_no_comparison_section_without_a_shared_cell(tmp_path):
    (tmp_path / bench.RESULTS).write_text(json.dumps(_record("cifar10", "badnets", "tac", 0.8, 0.1)) + "\n")
    assert "BackdoorBench" not in bench.write_tables(tmp_path).read_text()
