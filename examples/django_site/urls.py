"""URLs of django_site."""

from django.urls import path

from django_site import views

urlpatterns = [
    path("books/<str:isbn>", views.book),
    path("metrics", views.metrics),
    path("healthz", views.healthz),
]
