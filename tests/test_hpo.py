"""Hyperparameter search: studies over recipe fields, pruning, resuming after SIGKILL, a shared PostgreSQL study."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml

from unitune import hpo
from unitune.config import RecipeError, load_recipe


@pytest.fixture
def recipe_file(tiny_recipe, tmp_path) -> Path:
    recipe = {**tiny_recipe, "train": {**tiny_recipe["train"], "steps": 4, "eval_every": 2},
              "eval": {**tiny_recipe["eval"], "generate": 0, "before": False}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _search(tmp_path: Path, name: str = "search", **fields) -> Path:
    data = {"metric": "val_loss", "direction": "minimize", "trials": 3, "sampler": "random",
            "dir": str(tmp_path / "study"), **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study' / 'study.db'}"


def test_a_study_searches_the_space_and_writes_its_results(recipe_file, tmp_path):
    space = {"train.lr": {"low": 1.0e-4, "high": 3.0e-2, "log": True}, "method.r": [2, 8], "train.batch_size":
             {"low": 1, "high": 3}}
    study = hpo.run(str(recipe_file), str(_search(tmp_path, space=space, pruner="none")))
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    for t in trials:
        assert 1e-4 <= t.params["train.lr"] <= 3e-2 and t.params["method.r"] in (2, 8)
        assert isinstance(t.params["train.batch_size"], int)
        run_dir = tmp_path / "study" / "trials" / f"trial-{t.number}"
        ran = load_recipe(run_dir / "recipe.yaml")  # the trial trained with the values it drew
        assert ran.train.lr == pytest.approx(t.params["train.lr"]) and ran.method.r == t.params["method.r"]
        assert ran.train.batch_size == t.params["train.batch_size"]
        assert sorted(t.intermediate_values) == [2, 4]  # every evaluation but the untrained model's
    best = load_recipe(tmp_path / "study" / "best.yaml")
    assert best.train.lr == pytest.approx(study.best_trial.params["train.lr"]) and best.train.steps == 4
    assert study.best_value == min(t.value for t in trials)
    results = (tmp_path / "study" / "results.md").read_text()
    assert results.count("| complete |") == 3 and f"{study.best_value:.4f}" in results
    assert (tmp_path / "study" / "history.png").stat().st_size > 1000
    assert (tmp_path / "study" / "importance.png").stat().st_size > 1000

    more = hpo.run(str(recipe_file), str(_search(tmp_path, space=space, pruner="none")), trials=5)  # resumed
    drawn = [t.params["train.lr"] for t in more.get_trials()]
    assert len(drawn) == 5 and len(set(drawn)) == 5  # new values, not the first trials' again


def test_method_fields_apply_to_the_methods_that_take_them(recipe_file, tmp_path):
    space = {"method.name": ["lora", "ia3"], "method.r": [2, 4]}  # ia3 has no rank
    study = hpo.run(str(recipe_file), str(_search(tmp_path, space=space, trials=4, pruner="none")))
    for t in study.get_trials():
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert ("method.r" in t.params) == (t.params["method.name"] == "lora")


def test_a_trial_worse_than_the_median_is_pruned_at_an_evaluation(recipe_file, tmp_path):
    search = _search(tmp_path, space={"train.lr": [3.0e-2, 1.0e-7]}, pruner="median", trials=3)
    (tmp_path / "study").mkdir()
    study = optuna.create_study(storage=_storage(tmp_path), study_name="search", direction="minimize")
    for lr in (3.0e-2, 3.0e-2, 1.0e-7):  # two good trials first; the third barely moves from the start
        study.enqueue_trial({"train.lr": lr})
    study = hpo.run(str(recipe_file), str(search))
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]
    pruned = study.get_trials()[2]
    assert list(pruned.intermediate_values) == [2]  # stopped at its first evaluation, not trained to the end
    assert "| pruned |" in (tmp_path / "study" / "results.md").read_text()


def test_a_study_killed_with_sigkill_resumes_and_loses_no_finished_trial(recipe_file, tmp_path):
    recipe = yaml.safe_load(recipe_file.read_text())
    recipe["train"].update(steps=40, eval_every=20)  # killed after its first step: long enough to be mid-trial
    recipe_file.write_text(yaml.safe_dump(recipe))
    search = _search(tmp_path, space={"train.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}}, trials=2,
                     pruner="none")
    cmd = [sys.executable, "-m", "unitune", "hpo", str(recipe_file), str(search)]
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    trained = tmp_path / "study" / "trials" / "trial-1" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (trained.is_file() and trained.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # kill it once trial 0 has finished and trial 1 has trained a step
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert trained.is_file(), log.read_text()[-2000:]
    storage = _storage(tmp_path)
    killed = optuna.load_study(study_name="search", storage=storage).get_trials()
    assert [t.state for t in killed] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING]

    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "1 trial(s) of a killed run failed and queued again" in done.stdout
    trials = optuna.load_study(study_name="search", storage=storage).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                                         optuna.trial.TrialState.COMPLETE]
    assert trials[0].value == killed[0].value  # the finished trial is kept, not run again
    assert trials[2].params == killed[1].params and trials[2].user_attrs["retry_of"] == 1


def test_bad_searches_fail_before_any_trial(recipe_file, tmp_path):
    cases = [({"train.lrr": [1.0e-3]}, {}, "unknown recipe key 'train.lrr'.*did you mean 'lr'"),
             ({"method.rank_": [4]}, {}, "search.space.method.rank_"),
             ({"train.lr": {"low": 1.0e-3, "high": 1.0e-4}}, {}, "empty range"),
             ({"method.r": []}, {}, "empty list"),
             ({"method.name": ["lora", "lorra"]}, {}, "unknown method 'lorra'"),
             ({"train.lr": {"low": 0.0, "high": 1.0e-3, "log": True}}, {}, "log range needs low > 0"),
             ({"train.batch_size": [0]}, {}, "batch_size"),
             ({"train.lr": [1.0e-3]}, {"metric": "exact_match"}, "exact_match is not reported.*val_loss")]
    for i, (space, fields, message) in enumerate(cases):
        with pytest.raises(RecipeError, match=message):
            hpo.run(str(recipe_file), str(_search(tmp_path, f"bad{i}", space=space, **fields)))
    assert not (tmp_path / "study").exists()  # no study was started
    with pytest.raises(RecipeError, match="unknown recipe key 'search.metrics'"):
        hpo.run(str(recipe_file), str(_search(tmp_path, "typo", space={"train.lr": [1.0e-3]}, metrics="val_loss")))


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    return Path(found).resolve().parent if found else None  # /usr/local/bin holds links to a few tools only


@pytest.fixture
def postgres(tmp_path):
    """A PostgreSQL server of our own, in a temp directory (Debian's `postgresql` package); skipped without it."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (apt install postgresql)")
    pytest.importorskip("psycopg2")
    data = Path(tempfile.mkdtemp(prefix="unitune-pg-"))  # outside pytest's private tmp: the server user reads it
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the package's postgres user
        runuser = shutil.which("runuser", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
        if runuser is None:
            pytest.skip("running as root without runuser")
        shutil.chown(data, "postgres")
        as_user = [runuser, "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, bindir / "initdb", "-D", data, "-U", "unitune", "--auth=trust"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-l", data / "log", "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        subprocess.run([*as_user, bindir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "unitune", "studies"],
                       check=True, capture_output=True)
        yield f"postgresql+psycopg2://unitune@127.0.0.1:{port}/studies"
    finally:
        subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_one_study_in_postgresql(recipe_file, tmp_path, postgres):
    search = _search(tmp_path, space={"train.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}}, trials=4,
                     pruner="none", storage=postgres)
    cmd = [sys.executable, "-m", "unitune", "hpo", str(recipe_file), str(search)]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate()[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(o[-2000:] for o in outputs)
    trials = optuna.load_study(study_name="search", storage=postgres).get_trials()
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) >= 4 and len({t.params["train.lr"] for t in finished}) == len(finished), \
        [(t.number, t.params, t.user_attrs) for t in trials]
    assert all("trial " in o for o in outputs)  # both workers ran trials of the one study
