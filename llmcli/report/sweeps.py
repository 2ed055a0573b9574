"""What `llmcli report` says about a sweep dir beyond its trials' run dirs: the study's trials
(state, parameters, value), its progress against n_trials, and whether it is done, read from
`<sweep>/study.db` (the default storage; a server database is opened by `optuna-dashboard URL`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

STUDY_DB = "study.db"
_TRIAL_DIR = re.compile(r"^trial-(\d+)$")


def sweep_dirs(paths: list[str]) -> list[Path]:
    """The arguments that are sweep dirs: they hold the study's SQLite file."""
    return [Path(p) for p in paths if (Path(p) / STUDY_DB).is_file()]


def inspect_sweep(sweep_dir: Path) -> dict[str, Any]:
    """The study's trials and progress. `done`: no trial running or waiting, and the study holds its
    n_trials (as the sweep counts them) when the sweep recorded that number."""
    import optuna

    from llmcli.sweep.study import counted

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{sweep_dir.resolve() / STUDY_DB}"
    try:  # read-only; waits for a worker's write lock rather than failing
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}}, skip_table_creation=True)
        summaries = optuna.get_all_study_summaries(storage)
        (summary,) = [s for s in summaries if "confirms" not in s.user_attrs]  # the search study; a confirm study beside it
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        runs = [s for s in summaries if s.user_attrs.get("confirms") == study.study_name]
    except Exception as err:  # not yet created, several studies, or not an Optuna database
        return {"path": str(sweep_dir), "error": f"{type(err).__name__}: {err}"[:200]}
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    budget = study.user_attrs.get("budget")
    active = states.get("RUNNING", 0) + states.get("WAITING", 0)
    taken = sum(map(counted, trials))
    confirm: dict[str, int] = {}
    for t in optuna.load_study(study_name=runs[0].study_name, storage=storage).get_trials(deepcopy=False) if runs else []:
        if not t.user_attrs.get("surplus"):
            confirm[t.state.name] = confirm.get(t.state.name, 0) + 1
    active += confirm.get("RUNNING", 0) + confirm.get("WAITING", 0)
    return {
        "path": str(sweep_dir), "study": study.study_name, "budget": budget, "counted": taken, "states": states,
        "confirm_states": confirm, "done": active == 0 and (budget is None or taken >= budget)
        and (not study.user_attrs.get("confirm") or bool(study.user_attrs.get("confirm_done"))),
        "trials": {t.number: {"state": t.state.name, "params": dict(t.params), "value": t.value} for t in trials},
    }


def trial_of(run_dir: Path, sweeps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The study's view of a trial run dir (`<sweep>/trial-NNNN`), or None."""
    m = _TRIAL_DIR.match(run_dir.name)
    if not m:
        return None
    for sweep in sweeps:
        if Path(sweep["path"]).resolve() == run_dir.parent.resolve() and "trials" in sweep:
            found = sweep["trials"].get(int(m.group(1)))
            return {"number": int(m.group(1)), **found} if found else None
    return None


def progress_line(sweep: dict[str, Any]) -> str:
    """`sweep runs/s: 5 of 8 trials (complete 3, pruned 1, running 1)`."""
    if "error" in sweep:
        return f"sweep {sweep['path']}: study unreadable ({sweep['error']})"
    of = f" of {sweep['budget']}" if sweep.get("budget") else ""
    states = ", ".join(f"{n.lower()} {k}" for n, k in sorted(sweep["states"].items()))
    runs = ", ".join(f"{n.lower()} {k}" for n, k in sorted(sweep.get("confirm_states", {}).items()))
    runs = f"; confirm runs ({runs})" if runs else ""
    return f"sweep {sweep['path']}: {sweep['counted']}{of} trials ({states}){runs}{'' if not sweep['done'] else ', done'}"
