"""Ray's PBT and PB2 for runs of a known length: no exploit at a trial's last epoch (a clone made
then would restart only to report its source's last checkpoint again). Imported where a search
starts (it imports Ray); module-level classes, so that Tune can save them with the search's state."""

from __future__ import annotations

from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.schedulers.pb2 import PB2


class _LastEpochKept:
    def __init__(self, *, epochs: int, **kwargs):
        super().__init__(**kwargs)
        self._epochs = epochs

    def on_trial_result(self, tune_controller, trial, result):
        if result.get(self._time_attr, 0) >= self._epochs:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


class SodmPBT(_LastEpochKept, PopulationBasedTraining):
    pass


class SodmPB2(_LastEpochKept, PB2):
    pass
