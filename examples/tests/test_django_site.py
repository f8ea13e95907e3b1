"""The Django site through Django's test client, on the plugin's fake Redis."""

import os

import django
import pytest
from django.test import Client
from memofill.testing import Outcomes

from django_site import books

BOOK = {"isbn": "9780262510875", "pages": books.pages_of("9780262510875")}


@pytest.fixture(scope="module", autouse=True)
def _django_setup() -> None:
    """Set Django up once: CatalogueConfig.ready() runs before memofill_default takes over."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_site.settings")
    django.setup()


@pytest.fixture
def client() -> Client:
    return Client()


def test_a_book_is_fetched_once_then_served_from_redis(
    client: Client, memofill_default: object, memofill_outcomes: Outcomes
) -> None:
    upstream = memofill_outcomes.origin_calls(books.fetch_book)

    responses = [client.get("/books/9780262510875") for _ in range(3)]

    assert [r.json() for r in responses] == [BOOK] * 3
    assert upstream.count == 1
    memofill_outcomes.assert_outcomes("django:books:{isbn}", leader_fill=1, hit=2)


def test_an_unknown_book_is_remembered_as_missing(
    client: Client, memofill_default: object, memofill_outcomes: Outcomes
) -> None:
    upstream = memofill_outcomes.origin_calls(books.fetch_book)

    statuses = [client.get("/books/not-an-isbn").status_code for _ in range(2)]

    assert statuses == [404, 404]
    assert upstream.count == 1
    memofill_outcomes.assert_outcomes("django:books:{isbn}", negative=1, hit=1)


def test_metrics_count_the_calls(
    client: Client, memofill_default: object, memofill_outcomes: Outcomes
) -> None:
    for _ in range(3):
        client.get("/books/9780262510875")
    text = client.get("/metrics").content.decode()
    assert 'memofill_calls_total{dataset="django:books:{isbn}",outcome="hit"} 2.0' in text
    assert 'memofill_calls_total{dataset="django:books:{isbn}",outcome="leader_fill"} 1.0' in text
