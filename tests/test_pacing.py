"""The submit gate and poll timing: pure arithmetic over an injected clock, no network."""

from __future__ import annotations

import random

import pytest

from daemon.api import PollAnswer, PollVerdict, SubmitAnswer, SubmitVerdict
from daemon.pacing import (FIRST_SAFETY_POLL, KEY_REJECTED, NO_BALANCE, PollPlan, SubmitGate, full_jitter,
                           next_poll_time)

ACCEPTED = SubmitAnswer(SubmitVerdict.ACCEPTED, 202, request_id="r")
NO_MONEY = SubmitAnswer(SubmitVerdict.NO_BALANCE, 402, message="HTTP 402: Insufficient Balance")
BAD_KEY = SubmitAnswer(SubmitVerdict.AUTH, 401, message="HTTP 401: Unauthorized")
BAD_REQUEST = SubmitAnswer(SubmitVerdict.REJECTED, 400, message="HTTP 400: Model not found")
SERVER_ERROR = SubmitAnswer(SubmitVerdict.RETRY, 500, message="HTTP 500")


def too_many(retry_after=None):
    return SubmitAnswer(SubmitVerdict.RETRY, 429, retry_after=retry_after, message="HTTP 429")


def test_an_empty_wallet_pauses_and_probes_with_capped_exponential_backoff():
    gate = SubmitGate(4)
    assert gate.allowed(0.0, 4) == 4
    assert gate.on_submit(NO_MONEY, 0.0) == "paused" and gate.reason == NO_BALANCE
    assert gate.allowed(4.9, 4) == 0
    probes = []
    now = 0.0
    for _ in range(12):  # every probe is refused again
        now = gate.wake_at(now)
        assert gate.allowed(now, 4) == 1, "one probe when the backoff ran out"
        assert gate.allowed(now, 4) == 0, "and only one at a time"
        probes.append(now)
        assert gate.on_submit(NO_MONEY, now) is None  # still paused: nothing new to announce
    gaps = [b - a for a, b in zip([0.0] + probes, probes)]
    assert gaps[:4] == [5, 10, 20, 40]
    assert max(gaps) == 300 and gaps[-1] == 300
    now = gate.wake_at(now)
    assert gate.allowed(now, 4) == 1
    assert gate.on_submit(ACCEPTED, now) == "resumed" and not gate.paused
    assert gate.allowed(now, 4) == 4


def test_an_accept_for_a_submit_sent_before_the_pause_does_not_lift_it():
    gate = SubmitGate(4)
    gate.on_submit(NO_MONEY, 10.0, sent_at=9.0)
    assert gate.on_submit(ACCEPTED, 10.1, sent_at=9.0) is None and gate.paused
    assert gate.allowed(15.0, 4) == 1
    assert gate.on_submit(ACCEPTED, 15.2, sent_at=15.0) == "resumed"


def test_a_probe_that_never_submitted_lets_another_go():
    gate = SubmitGate(2)
    gate.on_submit(NO_MONEY, 0.0)
    assert gate.allowed(5.0, 2) == 1
    gate.launch_ended_without_submit()
    assert gate.allowed(5.0, 2) == 1


def test_the_pause_is_repeated_at_a_bounded_rate():
    gate = SubmitGate(2, reminder_every=600)
    assert not gate.reminder_due(0.0)
    gate.on_submit(NO_MONEY, 100.0)
    reminders = [t for t in range(100, 100 + 3600, 10) if gate.reminder_due(float(t))]
    assert reminders == [700, 1300, 1900, 2500, 3100]
    gate.on_submit(ACCEPTED, 3800.0)
    assert not gate.reminder_due(10_000.0)


def test_a_rejected_key_is_probed_at_once_after_a_reload():
    gate = SubmitGate(3)
    assert gate.on_submit(BAD_KEY, 0.0) == "paused" and gate.reason == KEY_REJECTED
    assert gate.allowed(1.0, 3) == 0
    gate.reload(1.0)
    assert gate.allowed(1.0, 3) == 1
    assert gate.on_submit(ACCEPTED, 1.2) == "resumed"


def test_polls_refused_for_the_key_pause_submits_and_a_good_poll_resumes_them():
    gate = SubmitGate(3)
    assert gate.on_key_rejected_by_poll("HTTP 403", 0.0) == "paused"
    assert gate.allowed(0.1, 3) == 0
    assert gate.on_key_accepted_by_poll() == "resumed"
    assert gate.allowed(0.2, 3) == 3
    gate.on_submit(NO_MONEY, 1.0)
    assert gate.on_key_accepted_by_poll() is None and gate.reason == NO_BALANCE  # polls say nothing of money


def test_a_key_pause_begun_by_a_submit_is_not_lifted_by_a_poll():
    """The status endpoint taking the key proves nothing about the submit endpoint: no flapping."""
    gate = SubmitGate(3)
    gate.on_submit(ACCEPTED, 0.0)
    gate.on_submit(BAD_KEY, 1.0)
    assert gate.on_key_accepted_by_poll() is None and gate.reason == KEY_REJECTED
    assert gate.allowed(6.0, 3) == 1 and gate.on_submit(ACCEPTED, 6.1, sent_at=6.0) == "resumed"


def test_429_holds_every_submit_until_retry_after_and_halves_the_window_once_per_hold():
    gate = SubmitGate(8)
    assert gate.on_submit(too_many(retry_after=2.0), 10.0) == "rate_limited"
    assert gate.limit == 4
    assert gate.allowed(11.9, 5) == 0 and gate.wake_at(11.0) == 12.0
    # the rest of the burst (submits sent before the halving) does not halve it again
    assert gate.on_submit(too_many(retry_after=2.0), 10.5, sent_at=9.9) is None and gate.limit == 4
    assert gate.allowed(12.5, 5) == 5
    assert gate.on_submit(too_many(retry_after=1.0), 13.0) == "rate_limited" and gate.limit == 2
    gate.on_submit(too_many(retry_after=1.0), 14.5)
    gate.on_submit(too_many(retry_after=1.0), 16.0)
    assert gate.limit == 1, "never below one job"
    gate.on_submit(too_many(retry_after=1.0), 18.0)
    assert gate.limit == 1


def test_the_window_grows_back_slowly_and_never_above_max_in_flight():
    gate = SubmitGate(8)
    for t in range(3):
        gate.on_submit(too_many(retry_after=0.5), float(t))
    assert gate.limit == 1
    accepts = 0
    while gate.limit < 8:
        gate.on_submit(ACCEPTED, 100.0)
        accepts += 1
    assert 20 <= accepts <= 40, accepts  # additive: about one more job per window of accepts
    for _ in range(100):
        gate.on_submit(ACCEPTED, 100.0)
    assert gate.limit == 8 and gate.window == 8


def test_429_without_retry_after_backs_off_with_full_jitter():
    gate = SubmitGate(4, rng=random.Random(7))
    holds = []
    for i in range(8):
        now = 1000.0 * i
        gate.on_submit(too_many(), now)
        holds.append(gate.held_until - now)
    assert all(0 <= h <= min(60, 2 ** (i + 1)) for i, h in enumerate(holds))
    assert len(set(holds)) == len(holds)  # jittered, not in lockstep
    gate.on_submit(ACCEPTED, 9000.0)
    assert gate.rate_limited_in_a_row == 0


def test_a_run_of_bad_requests_points_at_the_configuration_once():
    gate = SubmitGate(2)
    assert [gate.on_submit(BAD_REQUEST, float(t)) for t in range(5)] == [None, None, "all_rejected", None, None]
    gate.on_submit(ACCEPTED, 6.0)
    assert [gate.on_submit(BAD_REQUEST, float(t)) for t in range(2)] == [None, None]
    assert gate.on_submit(SERVER_ERROR, 7.0) is None and not gate.paused


@pytest.mark.parametrize("attempt, cap", [(0, 300), (3, 300), (20, 300), (5, 10)])
def test_full_jitter_stays_within_its_ceiling(attempt, cap):
    rng = random.Random(attempt)
    ceiling = min(cap, 2.0 * 2 ** attempt)
    values = [full_jitter(attempt, 2.0, cap, rng) for _ in range(200)]
    assert all(0 <= v <= ceiling for v in values) and max(values) > ceiling / 2


def test_polls_land_on_the_expected_finish_and_then_on_the_interval():
    assert next_poll_time(10.0, None, 5.0, None) == 15.0
    assert next_poll_time(10.0, 9.0, 5.0, 2.0) == pytest.approx(11.02)  # the predicted finish
    assert next_poll_time(11.1, 9.0, 5.0, 2.0) == pytest.approx(11.18)  # a quick follow-up
    assert next_poll_time(20.0, 9.0, 5.0, 2.0) == 25.0  # long overdue: the plain interval


# --------------------------------------------------------------------------- the poll plan


def answer(verdict: PollVerdict, status: int = 200, provider_seconds: float | None = None) -> PollAnswer:
    return PollAnswer(verdict, http_status=status, message="", provider_seconds=provider_seconds)


def test_a_job_with_a_webhook_waits_for_its_call_then_is_polled_at_once():
    plan = PollPlan(interval=0.25, job_timeout=600)
    plan.submitted(1, sent_at=0.0, now=0.0, webhook=True)
    plan.submitted(2, sent_at=0.0, now=0.0, webhook=False)
    assert plan.due([1, 2], now=0.25) == [2]  # without a webhook: the usual pace
    assert plan.next_time(skip=[2]) == pytest.approx(FIRST_SAFETY_POLL)  # nothing learnt yet: a safety poll
    assert plan.called_back(1, now=0.4) is False  # calls were arriving all along
    assert plan.due([1], now=0.4) == [1]
    plan.heard(1, answer(PollVerdict.WAITING), now=0.5, wall=100.0)
    assert plan.next_time(skip=[2]) == pytest.approx(0.75)  # its call came: the usual pace until it resolves


def test_a_job_finished_without_its_call_puts_every_job_back_on_the_usual_pace_once():
    plan = PollPlan(interval=0.25, job_timeout=600)
    for job_id in (1, 2):
        plan.submitted(job_id, sent_at=0.0, now=0.0, webhook=True)
    assert plan.due([1, 2], now=1.0) == []
    assert plan.heard(1, answer(PollVerdict.COMPLETED, provider_seconds=1.0), now=FIRST_SAFETY_POLL,
                      wall=100.0) is True  # found finished by a safety poll: no call came
    assert plan.webhooks_arrive is False and plan.expected == 1.0
    assert plan.due([2], now=FIRST_SAFETY_POLL) == [2]  # no longer waits for a call
    assert plan.heard(2, answer(PollVerdict.COMPLETED), now=FIRST_SAFETY_POLL, wall=100.0) is False  # said once
    plan.submitted(3, sent_at=20.0, now=20.0, webhook=True)
    assert plan.next_time(skip=()) <= 20.0 + 1.0 + 0.02  # plain polling around its predicted finish
    assert plan.called_back(3, now=20.5) is True and plan.webhooks_arrive  # calls arrive again: say so


def test_the_plan_hands_over_what_polls_heard_and_forgets_jobs_no_longer_followed():
    plan = PollPlan(interval=0.25, job_timeout=600)
    plan.submitted(1, sent_at=0.0, now=0.0, webhook=False)
    assert plan.due([7], now=1.0) == [7]  # submitted before a restart: polled at once
    plan.heard(1, answer(PollVerdict.WAITING), now=1.0, wall=50.0)
    plan.heard(7, answer(PollVerdict.RETRY, status=404), now=1.0, wall=50.0)
    heard = plan.take_heard()
    assert heard[1].still_waiting_at == 50.0 and heard[7].unusable_status == 404
    assert plan.take_heard() == {}
    plan.hear_again(7)
    assert list(plan.take_heard()) == [7]
    plan.keep_only([1])
    assert plan.due([1, 7], now=2.0) == [1, 7] and plan.next_time(skip=[1, 7]) is None
