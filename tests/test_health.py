from __future__ import annotations

from filter_worker.monitoring.health import Health
from tests.clock import ManualClock


def test_liveness_fails_when_the_loop_stops_turning():
    clock = ManualClock(0.0)
    health = Health(liveness_window_s=5, clock=clock)
    clock.now = 5
    assert health.live()
    clock.now = 5.5
    assert not health.live()
    health.progress()
    assert health.live()


def test_ready_needs_model_group_and_broker():
    health = Health(liveness_window_s=5)
    assert not health.ready()
    health.model_ready = True
    health.joined = True
    assert not health.ready()
    health.broker_reachable = True
    assert health.ready()
    assert "broker_reachable=True" in health.describe()
