"""ASHA whose rungs survive ``Tuner.restore``.

Tune saves the search algorithm's state with the experiment but not the scheduler's: a restored
search starts ASHA with empty rungs, so trials that run after a resume would be compared with nothing
(and never stopped) until new trials refill the rungs. This subclass refills them when Tune re-adds a
restored trial, from the results that trial already reported (its ``result.json`` in the experiment
directory), exactly as ``on_trial_result`` recorded them the first time.

Rungs are in training steps (``time_attr="step"``, reported with every checkpoint by pipeline/loop.py):
a resumed Ray Train run continues its step count, whereas ``training_iteration`` restarts at 1.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler

log = logging.getLogger(__name__)

TIME_ATTR = "step"


def reported_results(trial: Trial) -> list[dict[str, Any]]:
    """Every result the trial reported so far (empty for a new trial)."""
    storage = trial.storage
    if storage is None or storage.trial_dir_name is None:  # a new trial: no directory yet
        return []
    path = f"{storage.trial_fs_path}/result.json"
    try:
        with storage.storage_filesystem.open_input_stream(path) as f:
            text = f.readall().decode("utf-8")
    except (FileNotFoundError, OSError):
        return []
    results = []
    for line in text.splitlines():
        if line.strip():
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by the interruption
                continue
    return results


class ResumableASHA(AsyncHyperBandScheduler):
    """``AsyncHyperBandScheduler`` (one bracket) + rungs replayed for restored trials."""

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        replayed = 0
        for result in reported_results(trial):
            value = result.get(self._metric)
            if self._time_attr in result and isinstance(value, int | float) and value == value:
                bracket.on_result(trial, result[self._time_attr], self._metric_op * value)
                replayed += 1
        if replayed:
            log.info("ASHA: replayed %d earlier results of trial %s into the rungs", replayed, trial.trial_id)
