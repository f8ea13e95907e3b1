"""The Flask app from its factory, on the plugin's fake Redis."""

import pytest
from flask import Flask
from flask.testing import FlaskClient
from memofill import CacheFill, Dataset
from memofill.testing import Faults, Outcomes

import flask_app

FORECAST = {"city": "Oslo", "high_c": flask_app.high_of("Oslo")}

#: A follower gives up after 2 s, not 8: for the test that makes one wait.
QUICK = {
    "flask:forecasts:{city}": Dataset(
        "flask:forecasts:{city}",
        ttl_s=300,
        cache_fill=CacheFill(lease_ms=3_000, wait_ms=2_000, poll_min_ms=5, poll_max_ms=50),
    ),
}


@pytest.fixture(scope="module")
def app() -> Flask:
    """The app, created once: create_app() runs before memofill_default takes over."""
    return flask_app.create_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def test_a_forecast_is_fetched_once_then_served_from_redis(
    client: FlaskClient, memofill_default: object, memofill_outcomes: Outcomes
) -> None:
    upstream = memofill_outcomes.origin_calls(flask_app.fetch_forecast)

    responses = [client.get("/forecasts/Oslo") for _ in range(3)]

    assert [r.json for r in responses] == [FORECAST] * 3
    assert upstream.count == 1
    memofill_outcomes.assert_outcomes("flask:forecasts:{city}", leader_fill=1, hit=2)


@pytest.mark.memofill(policies=QUICK)
def test_a_request_returns_what_another_process_fetched(
    client: FlaskClient,
    memofill_default: object,
    memofill_faults: Faults,
    memofill_outcomes: Outcomes,
) -> None:
    upstream = memofill_outcomes.origin_calls(flask_app.fetch_forecast)
    with memofill_faults.lock_held("flask:forecasts:{city}", city="Oslo") as other_process:
        other_process.fill({"city": "Oslo", "high_c": -3}, after_ms=50)
        assert client.get("/forecasts/Oslo").json == {"city": "Oslo", "high_c": -3}
    assert upstream.count == 0
    # Usually the request waits for the value (follower_hit); on a slow machine the value
    # may land before the request reads it (hit). Either way it is the other process's.
    assert sum(memofill_outcomes.counts("flask:forecasts:{city}").values()) == 1
    assert memofill_outcomes.counts("flask:forecasts:{city}").keys() <= {"follower_hit", "hit"}


def test_metrics_count_the_calls(
    client: FlaskClient, memofill_default: object, memofill_outcomes: Outcomes
) -> None:
    for _ in range(3):
        client.get("/forecasts/Oslo")
    text = client.get("/metrics").text
    assert 'memofill_calls_total{dataset="flask:forecasts:{city}",outcome="hit"} 2.0' in text
    assert (
        'memofill_calls_total{dataset="flask:forecasts:{city}",outcome="leader_fill"} 1.0' in text
    )
