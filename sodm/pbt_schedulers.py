"""Ray's PBT and PB2 for runs of a known length, resumable: no exploit at a trial's last epoch (a
clone made then would restart only to report its source's last checkpoint again), and a resumed
search keeps the exploits on their epochs. Imported where a search starts (it imports Ray);
module-level classes, so that Tune can save them with the search's state.

Tune saves a search's trials, not its scheduler's state: a resumed search builds the scheduler
anew and adds each trial to it, and Ray's PBT would then take a restored trial for one that never
perturbed (its next report, past the interval since epoch 0, an exploit off the schedule). Each
restored trial here takes up where it starts again, the epoch of its latest checkpoint (a clone's
is its source's):
- asynchronous: its last perturbation at the last multiple of the interval it had reached;
- synchronous: the population's last meeting is the last multiple of the interval that every
  trial has reached (the meeting happens when the last one gets there), and every trial's last
  perturbation is that meeting. A trial that had reached the next meeting and was waiting there
  when the search stopped waits again, paused, ranked at the meeting with the score it reported
  there: it is not started (it would train past the meeting) until the others arrive, and if it
  is among the best its latest checkpoint is the one the weaker trials clone."""

from __future__ import annotations

from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.schedulers.pb2 import PB2


def restored_times(done: int, interval: int) -> tuple[int, int]:
    """A trial restarting from epoch `done`: (the last multiple of the interval it reached, the
    next one) under exploits every `interval` epochs."""
    last = done // interval * interval
    return last, last + interval


def restart_point(trial, time_attr: str) -> tuple[int, dict]:
    """Where a restored trial trains on from: (the epoch, the result) of its latest checkpoint,
    which after an exploit is its source's; else of its last result; (0, {}) for a new trial."""
    latest = getattr(trial.run_metadata.checkpoint_manager, "latest_checkpoint_result", None)
    result = (latest.metrics if latest is not None and latest.metrics
              else trial.run_metadata.last_result) or {}
    return int(result.get(time_attr) or 0), result


def _pause(tune_controller, trial, filed: bool) -> None:
    """A restored trial that waits at a meeting paused, as when it arrived there: Tune starts every
    pending trial whatever the scheduler says, and it would train past the meeting. One being
    added now is filed by Tune under its status after on_trial_add (Ray 2.60's add_trial; a test
    checks); one added before is moved by the controller itself."""
    if not filed:
        trial.set_status(Trial.PAUSED)
        return
    controller = getattr(tune_controller, "_tune_controller", tune_controller)  # past the wrapper
    controller._set_trial_status(trial, Trial.PAUSED)


class _KnownLength:
    def __init__(self, *, epochs: int, **kwargs):
        super().__init__(**kwargs)
        self._epochs = epochs
        self._restored = {}  # synchronous mode: every trial added, with where it trains on from

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)  # (a new state, for a retried trial too)
        done, result = restart_point(trial, self._time_attr)
        if not self._synch:
            if done:
                last, _ = restored_times(done, self._perturbation_interval)
                state = self._trial_state[trial]
                state.last_perturbation_time = state.last_train_time = last
            return
        if trial.status in (Trial.TERMINATED, Trial.ERROR) or done >= self._epochs:
            return  # will not train again: no meeting waits for it
        if self.__dict__.get("_under_way"):
            # a trial Tune retries after a failure: it takes up its place in the meetings the
            # others are at; theirs are left as they are
            meeting = self._next_perturbation_sync
            self._take_up(tune_controller, trial, done, result,
                          max(meeting - self._perturbation_interval, 0), meeting, filed=True)
            return
        restored = self.__dict__.setdefault("_restored", {})  # (one pickled before it existed)
        restored[trial] = (done, result)
        if not any(d for d, _ in restored.values()):
            return  # a new search
        last, meeting = restored_times(min(d for d, _ in restored.values()), self._perturbation_interval)
        for t, (d, r) in restored.items():
            self._take_up(tune_controller, t, d, r, last, meeting, filed=t is not trial)
        self._next_perturbation_sync = max(meeting, self._burn_in_period)

    def _take_up(self, tune_controller, trial, done: int, result: dict, last: int, meeting: int,
                 filed: bool) -> None:
        """Synchronous mode: a trial that trains on from epoch `done`, the last meeting at `last`
        and the next at `meeting`; one that has reached it waits there, ranked by its score."""
        state = self._trial_state[trial]
        state.last_perturbation_time = last
        state.last_train_time = done
        if done >= meeting and self._metric in result:
            state.last_score = self._metric_op * result[self._metric]
            state.last_result = result
            if trial.status == Trial.PENDING:
                _pause(tune_controller, trial, filed)

    def on_trial_result(self, tune_controller, trial, result):
        self._under_way = True  # trials added from now on are retried ones, not restored ones
        if result.get(self._time_attr, 0) >= self._epochs:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


class SodmPBT(_KnownLength, PopulationBasedTraining):
    pass


class SodmPB2(_KnownLength, PB2):
    pass
