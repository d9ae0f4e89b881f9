"""pipeline/placement_group_release.py on a real Ray without a dashboard (the ``ray_local`` fixture):
a stand-in Train controller actor runs the callback's hooks, creates a placement group and dies.

Killed without shutting down (what happens to a trial's controller when Tune stops the trial), its
placement group is removed by the watchdog; Ray alone keeps it while the job lives. After a normal
shutdown (the watchdog stopped first) the watchdog touches nothing.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.integration

WAIT_S = 60


def state_of(ray, placement_group) -> str:
    return ray.util.placement_group_table(placement_group).get("state", "REMOVED")


def wait_for_state(ray, placement_group, wanted: str) -> str:
    deadline = time.monotonic() + WAIT_S
    while (state := state_of(ray, placement_group)) != wanted and time.monotonic() < deadline:
        time.sleep(0.5)
    return state


@pytest.fixture
def controller_cls(ray_local):
    ray = ray_local
    from pipeline.placement_group_release import ReleasePlacementGroupOnControllerExit

    @ray.remote(num_cpus=0)
    class StandInController:
        """Runs the callback's hooks the way Train's controller does, in an actor of its own."""

        def __init__(self) -> None:
            self.callback = ReleasePlacementGroupOnControllerExit()
            self.callback.after_controller_start(None)

        def start_worker_group(self):
            placement_group = ray.util.placement_group([{"CPU": 1}])
            ray.get(placement_group.ready(), timeout=WAIT_S)
            state = SimpleNamespace(placement_group_handle=SimpleNamespace(placement_group=placement_group))
            self.callback.after_worker_group_start(SimpleNamespace(get_worker_group_state=lambda: state))
            return placement_group

        def shut_down(self) -> None:  # Train's order: its worker group first, then the callbacks
            self.callback.before_controller_abort()

    return StandInController


def test_a_killed_controllers_placement_group_is_removed(ray_local, controller_cls):
    ray = ray_local
    controller = controller_cls.remote()
    placement_group = ray.get(controller.start_worker_group.remote())
    assert state_of(ray, placement_group) == "CREATED"
    ray.kill(controller)
    assert wait_for_state(ray, placement_group, "REMOVED") == "REMOVED"


def test_a_controller_that_shuts_down_keeps_its_watchdog_away(ray_local, controller_cls):
    ray = ray_local
    controller = controller_cls.remote()
    placement_group = ray.get(controller.start_worker_group.remote())
    ray.get(controller.shut_down.remote())
    ray.kill(controller)
    time.sleep(5)  # the watchdog, were it still there, pings once a second
    assert state_of(ray, placement_group) == "CREATED"  # Train's shutdown removes it, not the watchdog
    ray.util.remove_placement_group(placement_group)
