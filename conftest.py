"""The test run's defaults. ``QLM_HTTP_WORKERS``: the suite runs the HTTP front door in the core
process unless told otherwise (``QLM_HTTP_WORKERS=2 python -m pytest`` runs it on two worker
processes), so that its results do not depend on the machine's core count."""

import os

os.environ.setdefault("QLM_HTTP_WORKERS", "0")
