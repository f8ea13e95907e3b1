"""The worker's job, in this process, on the plugin's fake Redis (the pool itself runs in the
repository's smoke tests, against a real Redis)."""

from memofill.testing import Faults, Outcomes

import worker


def test_jobs_on_one_currency_fetch_its_rate_once(
    memofill_default: object, memofill_outcomes: Outcomes
) -> None:
    upstream = memofill_outcomes.origin_calls(worker.exchange_rate)
    rate = worker.rate_of("NOK")

    converted = [worker.convert({"currency": "NOK", "amount": 10.0 * n}) for n in range(3)]

    assert [job["eur"] for job in converted] == [round(10.0 * n / rate, 2) for n in range(3)]
    assert upstream.count == 1
    memofill_outcomes.assert_outcomes("worker:rates:{currency}", leader_fill=1, hit=2)


def test_a_corrupt_rate_is_fetched_again(
    memofill_default: object, memofill_faults: Faults, memofill_outcomes: Outcomes
) -> None:
    memofill_faults.corrupt("worker:rates:{currency}", currency="NOK")
    assert worker.convert({"currency": "NOK", "amount": 50.0})["eur"] == round(
        50.0 / worker.rate_of("NOK"), 2
    )
    memofill_outcomes.assert_outcomes("worker:rates:{currency}", leader_fill=1)
