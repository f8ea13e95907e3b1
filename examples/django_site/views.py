"""Views of the catalogue."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from django_site.apps import METRICS
from django_site.books import fetch_book


def book(request: HttpRequest, isbn: str) -> JsonResponse:
    record = fetch_book(isbn)
    if record is None:
        return JsonResponse({"error": f"no book {isbn}"}, status=404)
    return JsonResponse(record)


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def metrics(request: HttpRequest) -> HttpResponse:
    return HttpResponse(generate_latest(METRICS), content_type=CONTENT_TYPE_LATEST)
