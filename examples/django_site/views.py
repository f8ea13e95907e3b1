"""Views of the catalogue."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse

from django_site.books import fetch_book


def book(request: HttpRequest, isbn: str) -> JsonResponse:
    record = fetch_book(isbn)
    if record is None:
        return JsonResponse({"error": f"no book {isbn}"}, status=404)
    return JsonResponse(record)


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})
