"""memofill's own dataset registry: the source of truth ``memofill gen`` reads.

The demo, the tests and the docs use these datasets. Most are coordinated across
processes (``cache_fill`` set), some of them key templates; one serves stale values
while one caller refreshes them; the last keeps the legacy process-local path.
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
    Dataset(
        "news:headlines:{lang}",
        ttl_s=60,
        stale_s=30,
        stale_if_error_s=300,
        cache_fill=CacheFill(
            lease_ms=2_500,
            wait_ms=2_000,
            poll_min_ms=25,
            poll_max_ms=500,
            early_beta=1.0,
            refresh_retry_ms=5_000,
        ),
    ),
    Dataset("weather:alerts:v2", ttl_s=300),
]
