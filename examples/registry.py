"""The datasets of the example applications: the source of truth ``memofill gen`` reads.

Each upstream takes about 0.2 s; the waits are generous (a follower waits up to
8 s for the leader's value) so that a stampede on a busy two-core CI machine
still calls each upstream once. A service would derive them from its upstream's
measured latency (see the docs' "Tuning the four timings").
"""

from memofill import CacheFill, Dataset

FILL = CacheFill(lease_ms=10_000, wait_ms=8_000, poll_min_ms=10, poll_max_ms=250)

DATASETS = [
    # fastapi_app.py: a pricing service's quote for one symbol.
    Dataset("fastapi:quotes:{symbol}", ttl_s=60, cache_fill=FILL),
    # fastapi_app.py: a blocking reference-data call, from a def route.
    Dataset("fastapi:listings:{symbol}", ttl_s=3600, cache_fill=FILL),
    # flask_app.py: a weather service's forecast for one city.
    Dataset("flask:forecasts:{city}", ttl_s=300, cache_fill=FILL),
    # django_site/: a catalogue's record of one book.
    Dataset("django:books:{isbn}", ttl_s=3600, negative_ttl_s=60, cache_fill=FILL),
    # worker.py: an exchange rate, shared by the jobs of a worker pool.
    Dataset("worker:rates:{currency}", ttl_s=600, cache_fill=FILL),
]
