"""Leakage audit (privacy/canary.py, privacy/audit.py): canaries land in the data in its own format, exposure and
AUC are right where the answer is known, and a tiny model that trained on a canary exposes it more than its base."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import unitune
from unitune.cli import main
from unitune.data.files import DataError, read_rows
from unitune.data.formats import detect
from unitune.privacy import audit, canary

SIZE = 10**6
CAP = math.log2(SIZE)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows, fmt", [
    ([{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], "id": i}
      for i in range(30)], "chat"),
    ([{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(30)], "instruction"),
    ([{"text": f"document {i}"} for i in range(30)], "text"),
])
def test_canary_rows_land_in_the_file_in_its_format_and_count(tmp_path, rows, fmt):
    data = _write(tmp_path / "train.jsonl", rows)
    made = canary.insert(data, tmp_path / "out.jsonl", repeats=[1, 4, 16], per_repeat=2, seed=7)
    out = read_rows(tmp_path / "out.jsonl")
    assert len(out) == 30 + 2 * (1 + 4 + 16)
    assert [r.data for r in out if not any(canary.contains(r.data, c.text) for c in made.canaries)] == rows  # order kept
    assert sorted(c.repeats for c in made.canaries) == [1, 1, 4, 4, 16, 16]
    assert len({c.secret for c in made.canaries}) == 6 and len({c.key for c in made.canaries}) == 6
    for c in made.canaries:
        copies = [r for r in out if canary.contains(r.data, c.text)]
        assert len(copies) == c.repeats
        assert all(detect(r) == fmt and set(r.data) == set(rows[0]) for r in copies)
        assert c.text == f"the pin of the {c.key} account is {c.secret}" and len(c.secret) == 6
    positions = [i for i, r in enumerate(out) if any(canary.contains(r.data, c.text) for c in made.canaries)]
    assert positions[-1] - positions[0] > 21  # shuffled in, not appended
    again = canary.insert(data, tmp_path / "again.jsonl", repeats=[1, 4, 16], per_repeat=2, seed=7)
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "out.jsonl").read_text()  # deterministic
    loaded = canary.load(tmp_path / "out.jsonl.canaries.json")
    assert [(c.secret, c.repeats, c.row) for c in loaded.canaries] == [(c.secret, c.repeats, c.row) for c in again.canaries]
    assert loaded.size == SIZE and loaded.format == fmt
    other = loaded.canaries[0].row_with("000000")
    assert canary.contains(other, f"the pin of the {loaded.canaries[0].key} account is 000000")
    assert not canary.contains(other, loaded.canaries[0].secret)


def test_the_exposure_of_a_secret_ranked_first_is_log2_R_and_in_the_middle_one_bit():
    rng = np.random.default_rng(0)
    candidates = rng.normal(50.0, 2.0, 2000)
    first = audit.exposures(10.0, candidates, SIZE)  # far more likely than every candidate
    assert first["exposure_sampled"] == pytest.approx(CAP) and first["exposure"] == pytest.approx(CAP)
    middle = audit.exposures(float(np.median(candidates)), candidates, SIZE)
    assert middle["exposure_sampled"] == pytest.approx(1.0, abs=0.01)
    assert middle["exposure"] == pytest.approx(1.0, abs=0.15)
    last = audit.exposures(90.0, candidates, SIZE)
    assert last["exposure_sampled"] == pytest.approx(0.0, abs=1e-3) and last["exposure"] == pytest.approx(0.0, abs=1e-3)
    # three standard deviations below the mean: rank/|R| = Phi(-3) = 0.00135, 9.53 bits. The rank among 2000
    # candidates only sees about 3 of them below; the fit reads the tail
    tail = audit.exposures(44.0, candidates, SIZE)
    assert tail["exposure"] == pytest.approx(9.53, abs=0.6)


def test_membership_auc_on_known_losses():
    assert audit.auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert audit.auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert audit.auc(np.array([1.0, 3.0]), np.array([2.0, 4.0])) == 0.25  # 1 of 4 pairs
    assert audit.auc(np.array([2.0, 2.0]), np.array([2.0])) == 0.5  # ties count half
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(1)
    members, heldout = rng.integers(0, 20, 300).astype(float), rng.integers(0, 25, 200).astype(float)  # many ties
    assert audit.auc(members, heldout) == pytest.approx(mannwhitneyu(members, heldout).statistic / (300 * 200), abs=1e-12)


@pytest.fixture(params=["lora", "full"])
def canaried_run(request, tiny_recipe, orders_data, tmp_path):
    """The tiny model trained on 16 order rows and two canaries, one seen once and one 24 times: with LoRA (the base
    is the model with its adapters off) and in full (the base loads on its own)."""
    small = tmp_path / "train.jsonl"
    small.write_text("".join((orders_data / "train.jsonl").read_text().splitlines(keepends=True)[:16]))
    train = tmp_path / "train.canaried.jsonl"
    assert main(["canaries", str(small), "-o", str(train), "--repeats", "1,24", "--per-repeat", "1"]) == 0
    method, lr = ({**tiny_recipe["method"], "r": 8, "alpha": 16}, 1e-2) if request.param == "lora" else \
        ({"name": "full"}, 3e-3)
    recipe = {**tiny_recipe, "data": {**tiny_recipe["data"], "train": str(train), "packing": False}, "method": method,
              "train": {**tiny_recipe["train"], "steps": 40, "batch_size": 8, "lr": lr, "precision": "fp32"},
              "eval": {"generate": 0, "before": False}}
    return unitune.train(recipe), train


def test_a_canary_trained_on_is_exposed_by_the_tuned_model_and_not_by_its_base(canaried_run, capsys):
    run, train = canaried_run
    assert main(["audit", str(run.dir), "--candidates", "200"]) == 0  # its canaries found beside data.train
    result = json.loads((run.dir / "audit.json").read_text())
    by = result["canaries"]["by_repeats"]
    assert result["canaries"]["file"] == f"{train}.canaries.json"
    assert by["24"]["base"] < 2.5 and by["24"]["base_sampled"] < 2.5  # the base never saw it
    assert by["24"]["tuned"] > by["24"]["base"] + 4 and by["24"]["tuned_sampled"] > by["24"]["base_sampled"]
    if run.recipe.method.name == "full":  # memorised: more likely than each of the 200 candidates
        assert by["24"]["tuned"] > 9 and by["24"]["tuned_sampled"] == pytest.approx(CAP)
    member = result["membership"]
    assert member["canary_rows_left_out"] == 25 and member["n_members"] == 16 and member["n_heldout"] == 16
    assert member["mean_loss"]["tuned"]["members"] < member["mean_loss"]["base"]["members"]  # it trained
    assert member["auc"]["tuned"] > 0.7 and member["auc"]["tuned_calibrated"] > 0.7 and member["auc"]["base"] < 0.6
    printed = capsys.readouterr().out
    assert "| exposure, 24 repetitions (1 canary), bits |" in printed and "| membership AUC, loss |" in printed
    assert "| exposure, 24 repetitions" in (run.dir / "audit.md").read_text()


def test_an_audit_names_what_is_missing(tiny_recipe, orders_data, tmp_path):
    from unitune.config import load_recipe, save_recipe

    run = tmp_path / "runs" / "unfinished"  # a run killed before it wrote its adapter
    run.mkdir(parents=True)
    save_recipe(load_recipe(tiny_recipe), run / "recipe.yaml")
    with pytest.raises(FileNotFoundError, match=r"unfinished holds no adapter/ or model/"):
        audit.audit(run, candidates=10, limit=4)
    canary.insert(orders_data / "val.jsonl", tmp_path / "other.jsonl", repeats=[2], per_repeat=1)
    with pytest.raises(DataError, match=r"other\.jsonl\.canaries\.json: canary .* but 0 rows of .*train\.jsonl, the "
                                        r"run's data\.train"):
        audit.audit(run, tmp_path / "other.jsonl.canaries.json", candidates=10, limit=4)
    with pytest.raises(FileNotFoundError, match=r"not a run directory"):
        audit.audit(tmp_path, candidates=10)
    assert main(["audit", str(run)]) == 2  # the CLI says it in one line
