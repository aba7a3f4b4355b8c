"""Ray's PBT and PB2 for runs of a known length, resumable: no exploit at a trial's last epoch (a
clone made then would restart only to report its source's last checkpoint again), and a resumed
search keeps the exploits on their epochs. Imported where a search starts (it imports Ray);
module-level classes, so that Tune can save them with the search's state.

Tune saves a search's trials, not its scheduler's state: a resumed search builds the scheduler
anew and adds each trial to it, and Ray's PBT would then take a restored trial for one that never
perturbed (its next report, past the interval since epoch 0, an exploit off the schedule). Each
restored trial here takes up where it was: its last perturbation at the last multiple of the
interval it had reached, and, in synchronous mode, the population's next meeting at the first
multiple that some restored trial has not reached yet."""

from __future__ import annotations

from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.schedulers.pb2 import PB2


def restored_times(done: int, interval: int) -> tuple[int, int]:
    """A restored trial that last reported epoch `done`: (its last perturbation, the next
    meeting it has to reach) under exploits every `interval` epochs."""
    last = done // interval * interval
    return last, last + interval


class _KnownLength:
    def __init__(self, *, epochs: int, **kwargs):
        super().__init__(**kwargs)
        self._epochs = epochs
        self._restored_meeting = None  # synchronous mode: the earliest meeting of restored trials

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        done = trial.run_metadata.last_result.get(self._time_attr)
        if not done:  # a new trial (or one restored before its first epoch)
            return
        last, meeting = restored_times(int(done), self._perturbation_interval)
        state = self._trial_state[trial]
        state.last_perturbation_time = last
        state.last_train_time = last
        if self._synch:
            earliest = getattr(self, "_restored_meeting", None) or meeting  # (one pickled before)
            self._restored_meeting = min(meeting, earliest)
            self._next_perturbation_sync = max(self._restored_meeting, self._burn_in_period)

    def on_trial_result(self, tune_controller, trial, result):
        if result.get(self._time_attr, 0) >= self._epochs:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


class SodmPBT(_KnownLength, PopulationBasedTraining):
    pass


class SodmPB2(_KnownLength, PB2):
    pass
