"""Settings of django_site: no database, one app, memofill's records on the console."""

import os

SECRET_KEY = "django-site-example-only"  # an example, never deployed
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
INSTALLED_APPS = ["django_site.apps.CatalogueConfig"]
ROOT_URLCONF = "django_site.urls"
WSGI_APPLICATION = "django_site.wsgi.application"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

#: Where memofill keeps its values and locks; read once, in CatalogueConfig.ready().
REDIS_URL = os.environ["REDIS_URL"]

# One record per coordinated miss on the `memofill` logger (see the docs' logging page).
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"memofill": {"handlers": ["console"], "level": "INFO"}},
}
