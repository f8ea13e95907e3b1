"""The FastAPI app through its lifespan, on the plugin's fake Redis."""

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from memofill.testing import Faults, Outcomes

import fastapi_app

QUOTE = {"symbol": "ACME", "price": fastapi_app.price_of("ACME")}
LISTING = {"symbol": "ACME", "exchange": fastapi_app.exchange_of("ACME")}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    """The app, started once: its lifespan runs before memofill_default takes over."""
    with TestClient(fastapi_app.app) as client:
        yield client


def test_a_quote_is_fetched_once_then_served_from_redis(
    client: TestClient, memofill_default: object, memofill_outcomes: Outcomes
) -> None:
    upstream = memofill_outcomes.origin_calls(fastapi_app.fetch_quote)

    responses = [client.get("/quotes/ACME") for _ in range(3)]

    assert [r.json() for r in responses] == [QUOTE] * 3
    assert upstream.count == 1
    memofill_outcomes.assert_outcomes("fastapi:quotes:{symbol}", leader_fill=1, hit=2)


def test_quotes_are_served_while_redis_is_down(
    client: TestClient,
    memofill_default: object,
    memofill_faults: Faults,
    memofill_outcomes: Outcomes,
) -> None:
    with memofill_faults.redis_down():
        assert client.get("/quotes/ACME").json() == QUOTE
    memofill_outcomes.assert_outcomes("fastapi:quotes:{symbol}", lock_error=1)


def test_metrics_count_the_calls(
    client: TestClient, memofill_default: object, memofill_outcomes: Outcomes
) -> None:
    for _ in range(3):
        client.get("/quotes/ACME")
    text = client.get("/metrics/").text
    assert 'memofill_calls_total{dataset="fastapi:quotes:{symbol}",outcome="hit"} 2.0' in text
    assert (
        'memofill_calls_total{dataset="fastapi:quotes:{symbol}",outcome="leader_fill"} 1.0' in text
    )


def test_a_def_route_calls_a_plain_cached_function_once(
    client: TestClient, memofill_default: object, memofill_outcomes: Outcomes
) -> None:
    upstream = memofill_outcomes.origin_calls(fastapi_app.fetch_listing)

    responses = [client.get("/listings/ACME") for _ in range(3)]

    assert [r.json() for r in responses] == [LISTING] * 3
    assert upstream.count == 1
    memofill_outcomes.assert_outcomes("fastapi:listings:{symbol}", leader_fill=1, hit=2)


def test_the_lifespan_configures_a_blocking_client_for_the_def_routes(client: TestClient) -> None:
    # No memofill_default: the clients are the lifespan's own, on a port where nothing listens
    # (conftest.py). Redis is unreachable, so the call is served uncoordinated; with an asyncio
    # client alone, a plain cached function would fail with a ConfigurationError instead.
    response = client.get("/listings/XYZ")
    assert response.json() == {"symbol": "XYZ", "exchange": fastapi_app.exchange_of("XYZ")}
