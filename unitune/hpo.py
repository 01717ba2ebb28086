"""Hyperparameter search: an Optuna study over any recipe field (`unitune hpo RECIPE SEARCH.yaml`).

A search file names the metric, its direction and the space; every trial is one training run of the recipe
with the trial's values as overrides, pruned (median or Hyperband) on the metric as each evaluation reports
it. The study lives in a directory: Optuna's storage (SQLite there by default, so a killed study resumes and
loses no finished trial; a PostgreSQL URL lets several machines share one study), the trials' run
directories, results.md, importance and history plots, and best.yaml, the recipe with the best values.

    metric: exact_match          # a metric the recipe's evaluation reports (checked before any trial)
    direction: maximize
    trials: 12
    space:
      train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}   # a float range (ints give an int range)
      method.r: [8, 16, 32]                               # a list: the choices
      method.name: [lora, adapter]                        # method.* keys apply to the methods that take them

Everything is checked before the first trial: a field the recipe does not have, an empty range or choice
list, and a metric the evaluation does not report (found by evaluating the base model on a few rows).
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import math
import os
import random
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from unitune import atomic
from unitune.config import RecipeError, Section, load_recipe, save_recipe, validate_section


class Range(Section):
    low: int | float  # ints at both ends (and step) make an int range
    high: int | float
    log: bool = False
    step: int | float | None = None

    @property
    def ints(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))


class Search(Section):
    metric: str = "val_loss"
    direction: Literal["minimize", "maximize"] = "minimize"
    trials: int = Field(10, gt=0)  # finished trials the study aims at (complete or pruned), across all workers
    space: dict[str, Range | list[Any]]
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    seed: int = 0
    name: str | None = None  # the study's name; default: the search file's stem
    dir: str | None = None  # the study directory; default: <recipe output.dir>/hpo/<name>
    storage: str | None = None  # an Optuna storage URL; default: sqlite:///<dir>/study.db


def load_search(path: str | Path) -> Search:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"search file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    search = validate_section(Search, data, "search")
    search.name = search.name or path.stem
    return search


def check_space(recipe_path: str, overrides: list[str], search: Search) -> None:
    """Every field the space names is one the recipe takes, with a non-empty range or choice list."""
    if not search.space:
        raise RecipeError("search.space is empty: name at least one recipe field to search")
    methods = search.space.get("method.name") or [load_recipe(recipe_path, overrides).method.name]
    for key, values in search.space.items():
        where = f"search.space.{key}"
        if isinstance(values, list):
            if not values:
                raise RecipeError(f"{where}: an empty list of choices")
            samples = values
        else:
            if values.high < values.low or (values.high == values.low and not values.step):
                raise RecipeError(f"{where}: an empty range [{values.low}, {values.high}]")
            if values.log and values.low <= 0:
                raise RecipeError(f"{where}: a log range needs low > 0, got {values.low}")
            samples = [values.low, values.high]
        takers = methods if key.startswith("method.") else methods[:1]
        for value in samples:
            tried = [[f"method.name={value}"]] if key == "method.name" else \
                [[f"method.name={m}", f"{key}={_text(value)}"] for m in takers]
            errors = [e for e in (_error(recipe_path, [*overrides, *t]) for t in tried) if e]
            if len(errors) == len(tried):  # no method takes it (a method.* field may belong to some of them)
                raise RecipeError(f"{where}: {errors[0]}")


def _error(recipe_path: str, overrides: list[str]) -> str | None:
    """What is wrong with the recipe under these overrides, or None."""
    try:  # quietly: another method's name sets aside the recipe's own method keys, with a notice
        with contextlib.redirect_stderr(io.StringIO()):
            load_recipe(recipe_path, overrides)
    except RecipeError as err:
        return str(err)
    return None


def _text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def check_metric(recipe_path: str, overrides: list[str], search: Search) -> None:
    """The metric is one the evaluation reports: the base model evaluated on a few rows says which it gives."""
    from unitune import api

    probe = [*overrides, "data.max_examples=8", "eval.generate=2"] \
        if load_recipe(recipe_path, overrides).eval.generate else [*overrides, "data.max_examples=8"]
    reported = api.evaluate(recipe_path, probe)["base"]
    if search.metric not in reported:
        raise RecipeError(f"search.metric={search.metric} is not reported by this recipe's evaluation; it reports: "
                          f"{', '.join(sorted(reported))}")


def _suggest(trial, search: Search, method: str) -> list[str]:
    """The trial's overrides: method.name first, so method fields apply only to methods that take them."""
    from unitune.methods import METHODS

    out = []
    if "method.name" in search.space:
        method = trial.suggest_categorical("method.name", search.space["method.name"])
        out.append(f"method.name={method}")
    fields = METHODS[method].Config.model_fields
    for key, values in search.space.items():
        if key == "method.name" or (key.startswith("method.") and key.split(".", 1)[1] not in fields):
            continue
        if isinstance(values, list):
            value = trial.suggest_categorical(key, values)
        elif values.ints:
            value = trial.suggest_int(key, values.low, values.high, step=values.step or 1, log=values.log)
        else:
            value = trial.suggest_float(key, values.low, values.high, log=values.log, step=values.step)
        out.append(f"{key}={_text(value)}")
    return out


def _storage(search: Search, study_dir: Path):
    import optuna

    from sqlalchemy.exc import DBAPIError

    url = search.storage or f"sqlite:///{study_dir / 'study.db'}"
    for attempt in range(5):
        try:
            # heartbeats: a trial whose worker on another machine died is failed after the grace period and retried
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
            return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120,
                                              heartbeat_stale_trial_callback=retry)
        except DBAPIError:  # workers started together race to create Optuna's tables in an empty database
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())


def _fail_orphans(study) -> int:
    """Trials left RUNNING by a worker of this machine that is gone (killed): failed, and their values queued
    again, so the study resumes where it was and reruns what the kill interrupted."""
    import optuna

    host, orphans = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("host") != host or _alive(t.user_attrs.get("pid")):
            continue
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        orphans += 1
    return orphans


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()  # this process is starting anew, so its own old trials are not running


def run(recipe_path: str, search_path: str, overrides: list[str] | None = None, trials: int | None = None,
        storage: str | None = None):
    """Run (or resume) the study; returns it. Writes results.md, the plots and best.yaml as trials finish."""
    import optuna

    overrides = list(overrides or [])
    search = load_search(search_path)
    search.trials = trials or search.trials
    search.storage = storage or search.storage
    recipe = load_recipe(recipe_path, overrides)
    study_dir = Path(search.dir or Path(recipe.output.dir) / "hpo" / search.name)
    check_space(recipe_path, overrides, search)
    check_metric(recipe_path, overrides, search)
    study_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, plots
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    steps = recipe.train.steps or 1
    pruners = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2),
               "hyperband": lambda: optuna.pruners.HyperbandPruner(
                   min_resource=recipe.train.eval_every or steps, max_resource=steps),
               "none": optuna.pruners.NopPruner}
    storage = _storage(search, study_dir)
    # A resumed study, or workers sharing one (a server's storage), must not redraw the values drawn before:
    # the seed moves on by the trials already there, and apart for each worker on a shared storage.
    existing = next((s.n_trials for s in optuna.get_all_study_summaries(storage) if s.study_name == search.name), 0)
    mixed = f"{search.seed}:{existing}:{os.getpid() if search.storage else 0}"  # mixed, not summed: seed+1+pid
    seed = int(hashlib.sha256(mixed.encode()).hexdigest()[:8], 16)            # would equal seed+0+(pid+1)
    study = optuna.create_study(storage=storage, study_name=search.name, load_if_exists=True,
                                direction=search.direction, sampler=samplers[search.sampler](seed=seed),
                                pruner=pruners[search.pruner]())
    if orphans := _fail_orphans(study):
        print(f"unitune: hpo: {orphans} trial(s) of a killed run failed and queued again", flush=True)
    if not recipe.train.eval_every and search.pruner != "none":
        print("unitune: hpo: the recipe evaluates only at the end (train.eval_every unset): nothing to prune on",
              flush=True)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    print(f"unitune: hpo: study {search.name} in {study_dir}: {done} of {search.trials} trials finished; "
          f"{search.direction} {search.metric}", flush=True)

    def objective(trial) -> float:
        from unitune import api

        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        values = _suggest(trial, search, recipe.method.name)
        print(f"\nunitune: hpo: trial {trial.number}: {' '.join(values)}", flush=True)

        def report(step: int, metrics: dict) -> None:
            if step == 0:
                return  # the untrained model: the same for every trial that shares a method
            trial.report(metrics[search.metric], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{search.metric}={metrics[search.metric]:.4f} at step {step}")

        started = time.time()
        try:
            result = api.train(recipe_path, [*overrides, *values, f"output.dir={study_dir / 'trials'}",
                                             f"output.name=trial-{trial.number}", "output.overwrite=true"],
                               on_eval=report)
        finally:
            trial.set_user_attr("seconds", round(time.time() - started, 1))
            gc.collect()
        value = result.metrics[search.metric]
        if not math.isfinite(value):
            raise ValueError(f"{search.metric} is {value}")
        return value

    def write(study, _trial=None) -> None:
        write_results(study, search, recipe_path, overrides, study_dir)

    remaining = search.trials - done
    if remaining > 0:
        from unitune.engine.loop import NonFiniteLoss

        study.optimize(objective, n_trials=remaining, catch=(NonFiniteLoss,), gc_after_trial=True,
                       callbacks=[optuna.study.MaxTrialsCallback(search.trials, states=finished), write])
    write(study)
    return study


def write_results(study, search: Search, recipe_path: str, overrides: list[str], study_dir: Path) -> None:
    """results.md (every trial), best.yaml (the recipe with the best values) and Optuna's plots."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    names = list(search.space)
    lines = [f"# Study {search.name}: {search.direction} {search.metric}", "",
             "| trial | state | " + " | ".join(names) + f" | {search.metric} | steps | seconds |",
             "|---:|---|" + "---|" * len(names) + "---:|---:|---:|"]
    for t in trials:
        last = max(t.intermediate_values, default="")  # the step a pruned trial stopped at, and its value there
        value = t.value if t.value is not None else t.intermediate_values.get(last)
        cells = [(f"{t.params[n]:.4g}" if isinstance(t.params[n], float) else _text(t.params[n])) if n in t.params
                 else "" for n in names]
        lines.append(f"| {t.number} | {t.state.name.lower()} | " + " | ".join(cells) +
                     f" | {'' if value is None else f'{value:.4f}'} | {last} | {t.user_attrs.get('seconds', '')} |")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        values = [f"{k}={_text(v)}" for k, v in best.params.items()]
        save_recipe(load_recipe(recipe_path, [*overrides, *values]), study_dir / "best.yaml")
        lines += ["", f"Best: trial {best.number}, {search.metric} = {best.value:.4f}, with {' '.join(values)}. "
                  f"Run it: `unitune train {study_dir / 'best.yaml'}`"]
        _plots(study, study_dir, len(complete))
    atomic.write_text(study_dir / "results.md", "\n".join(lines) + "\n")


def _plots(study, study_dir: Path, complete: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vm

    plots = {"history.png": vm.plot_optimization_history}
    if complete >= 2 and len(study.best_trial.params) >= 1:
        plots["importance.png"] = vm.plot_param_importances
    for name, plot in plots.items():
        try:
            ax = plot(study)
        except (ValueError, RuntimeError):  # e.g. importance when every trial drew the same values
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        with atomic.temp_path(study_dir / name) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
