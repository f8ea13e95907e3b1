"""memofill's own dataset registry: the source of truth ``memofill gen`` reads.

The demo, the tests and the docs use these datasets. Two are coordinated across
processes (``cache_fill`` set), one of them a key template; the last keeps the
legacy process-local path.
"""

from memofill import CacheFill, Dataset

DATASETS = [
    Dataset(
        "news:digest:v1",
        ttl_s=900,
        negative_ttl_s=120,
        cache_fill=CacheFill(lease_ms=15_000, wait_ms=10_000, poll_min_ms=25, poll_max_ms=500),
    ),
    Dataset(
        "market:quotes:{symbol}",
        ttl_s=60,
        cache_fill=CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=250),
    ),
    Dataset(
        "demo:stampede:{run}",
        ttl_s=60,
        negative_ttl_s=10,
        cache_fill=CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=250),
    ),
    Dataset("weather:alerts:v2", ttl_s=300),
]
