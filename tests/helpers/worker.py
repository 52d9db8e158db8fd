"""The internal plane's shared secret in the tests, and the size of the session's shared worker.

Every worker the tests start accepts TEST_WORKER_SECRET and every gateway they start sends it, through the
environment both inherit (tests/conftest.py sets it); clients the tests drive themselves send WORKER_AUTH_HEADERS
(raw WebSocket/HTTP) or WORKER_AUTH (WorkerSession.open, Calls).
"""

from gateway.plane import WorkerAuth, bearer

TEST_WORKER_SECRET = "personagate-tests-shared-secret-3f9c"
WORKER_AUTH_HEADERS = bearer(TEST_WORKER_SECRET)
WORKER_AUTH = WorkerAuth(secret=TEST_WORKER_SECRET)
WORKER_SLOTS = 3  # slots of the `worker` fixture's process (tests/conftest.py)
