"""The examples' tests run every app on the memofill plugin's fake Redis, a new one per test.

The apps read ``REDIS_URL`` when they start and configure memofill with a real
client on it. Here the start-up happens once per test module, before the
plugin's ``memofill_default`` fixture points memofill at the test's fake Redis
(a module-scoped fixture is set up before a test's own): so the real client is
never used. To be sure it could not reach a Redis even so, it points at a port
where nothing listens.
"""

import os

os.environ["REDIS_URL"] = "redis://127.0.0.1:9/0"
os.environ.pop("REDIS_CLUSTER_URL", None)
os.environ.pop("UPSTREAM_CALLS_FILE", None)
