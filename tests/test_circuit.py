"""The circuit breaker on its own: closed, open after failures in a row, one trial when half-open."""
from __future__ import annotations

from infinilm_svc.router.circuit import Circuit, CircuitState


def test_failures_in_a_row_open_it_and_a_success_between_them_starts_the_count_again():
    c = Circuit(eject_after=3, cooldown=10.0)
    assert not c.record_outcome(False, 0.0) and not c.record_outcome(False, 0.0)
    assert not c.record_outcome(True, 0.0) and c.failures == 0 and c.clean
    for _ in range(2):
        assert not c.record_outcome(False, 1.0)
    assert c.record_outcome(False, 1.0) and c.is_open and not c.can_execute()
    assert c.retry_in(5.0) == 6.0 and c.retry_in(20.0) == 0.0


def test_half_open_lets_one_trial_through_and_its_verdict_closes_or_reopens():
    c = Circuit(eject_after=1, cooldown=2.0)
    c.record_outcome(False, 0.0)
    assert c.state is CircuitState.OPEN and c.half_open()
    assert c.state is CircuitState.HALF_OPEN and c.can_execute()
    c.started()
    assert c.trial and not c.can_execute(), "a second request while the trial runs"
    c.abandoned()                      # its client left: no verdict, another may try
    assert c.can_execute()
    c.started()
    assert c.record_outcome(False, 5.0) and c.is_open and c.reopen_at == 7.0 and not c.trial
    c.half_open()
    c.started()
    assert c.record_outcome(True, 8.0) and c.closed and not c.trial and c.clean


def test_started_and_abandoned_change_nothing_while_closed_and_reset_forgets_everything():
    c = Circuit(eject_after=2, cooldown=1.0)
    c.started()
    c.abandoned()
    assert c.clean and not c.trial
    c.record_outcome(False, 0.0)
    c.record_outcome(False, 0.0)
    assert c.is_open
    c.reset()
    assert c.clean and c.can_execute() and c.retry_in(0.0) is None
