"""A Ray Train run's placement group is released however its controller ends (issue 25).

Ray Train's controller reserves each worker group's CPUs/GPUs in a placement group, created by the
controller actor. Ray removes an actor's placement group only when both that actor and its job are
gone, so while the driver lives (a Tune search: one job for all trials) a controller that dies
without shutting down leaves its placement group reserved. That is what happens to every trial Tune
stops (ASHA): Tune ends the trial's actor, which owns the controller, so the controller is killed
mid-run. Train's own ``PlacementGroupCleaner`` watches for this but learns that the controller died
from the State API, which only the dashboard serves; without it (an embedded Ray started lean,
`ray start --include-dashboard=false`, or a State API that times out on a busy head) it only logs
"Failed to query Ray Train Controller actor state" and never releases anything, and a search stalls
once the leaked groups hold every CPU.

``ReleasePlacementGroupOnControllerExit`` (a controller + worker-group callback, passed in the Train
``RunConfig``) starts a small detached ``PlacementGroupWatchdog`` per run that holds the controller's
actor handle and the current worker group's placement group, and asks Ray itself whether the
controller is still there (a no-op call on the handle fails with ``ActorDiedError`` once it is
gone), so it needs neither the dashboard nor the State API. It removes the placement group when the
controller is gone, and exits; a controller that shuts down normally removes its placement group
itself and stops the watchdog first.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0
# On the head node (like Train's own cleaner), so that losing a worker node does not lose the watchdog.
HEAD_NODE_RESOURCE = "node:__internal_head__"


class PlacementGroupWatchdog:
    """Detached actor: removes ``placement_group`` once ``controller`` is dead, then exits."""

    def __init__(self, controller: Any, interval_s: float = CHECK_INTERVAL_S) -> None:
        self._controller = controller
        self._interval_s = interval_s
        self._placement_group: PlacementGroup | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, name="PlacementGroupWatchdog", daemon=True).start()

    def watch(self, placement_group: PlacementGroup) -> None:
        """The controller's current worker group's placement group (a restarted group has a new one)."""
        with self._lock:
            self._placement_group = placement_group

    def stop(self) -> None:
        """The controller shuts down normally (it removes its placement group itself)."""
        self._stopped.set()
        ray.actor.exit_actor()

    def _controller_alive(self) -> bool:
        try:
            ray.get(self._controller.__ray_ready__.remote(), timeout=30)
        except ray.exceptions.ActorDiedError:
            return False
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
            pass  # busy or restarting: not known to be dead
        return True

    def _watch(self) -> None:
        while not self._stopped.wait(self._interval_s):
            if self._controller_alive():
                continue
            with self._lock:
                placement_group = self._placement_group
            if placement_group is not None and not self._stopped.is_set():
                release(placement_group)
            break
        if not self._stopped.is_set():  # done: end this actor (exit_actor only works inside a task)
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def release(placement_group: PlacementGroup) -> bool:
    """Remove ``placement_group`` unless Ray already did; True when this call removed it."""
    if placement_group_table(placement_group).get("state", "REMOVED") == "REMOVED":
        return False
    try:
        remove_placement_group(placement_group)
    except Exception as e:  # noqa: BLE001  (removed concurrently, e.g. by Train's own cleaner)
        log.warning("could not remove placement group %s: %s", placement_group.id.hex(), e)
        return False
    log.warning(
        "removed placement group %s: its Ray Train controller ended without shutting down "
        "(a trial the Tune scheduler stopped, or a lost driver)",
        placement_group.id.hex(),
    )
    return True


class ReleasePlacementGroupOnControllerExit(ControllerCallback, WorkerGroupCallback):
    """Train callback (in the controller): one ``PlacementGroupWatchdog`` per run, told each worker
    group's placement group, stopped when the controller shuts down or aborts normally."""

    def __init__(self) -> None:
        self._watchdog: Any = None

    def after_controller_start(self, train_run_context: Any) -> None:
        controller = ray.get_runtime_context().current_actor
        watchdog_cls = ray.remote(num_cpus=0)(PlacementGroupWatchdog)
        # "DEFAULT": outside any placement group the controller's caller captures (a Tune trial's).
        self._watchdog = watchdog_cls.options(
            lifetime="detached", resources={HEAD_NODE_RESOURCE: 0.001}, scheduling_strategy="DEFAULT"
        ).remote(controller)

    def after_worker_group_start(self, worker_group: Any) -> None:
        state = worker_group.get_worker_group_state()
        if self._watchdog is not None:
            ray.get(self._watchdog.watch.remote(state.placement_group_handle.placement_group))

    async def before_controller_shutdown(self) -> None:
        self._stop_watchdog()

    def before_controller_abort(self) -> None:
        self._stop_watchdog()

    def _stop_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        try:
            ray.get(watchdog.stop.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            pass  # exited while stopping: expected (exit_actor)
        except Exception as e:  # noqa: BLE001  (a watchdog left behind only exits when this controller does)
            log.warning("could not stop the placement-group watchdog: %s", e)
