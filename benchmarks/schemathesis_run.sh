#!/usr/bin/env bash
# Issue 14's acceptance run: schemathesis over the server's OpenAPI schema, every check on, at least 3,000
# requests (1,200 examples per operation: most of the ~900 requests of a short run come from the coverage phase). Prints the request count, the statuses and the 5xx count.
# Takes a few minutes on a small machine; CI runs the same test with 25 examples per operation.
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENMILL_SCHEMATHESIS_EXAMPLES="${TOKENMILL_SCHEMATHESIS_EXAMPLES:-1200}" \
    TOKENMILL_SCHEMATHESIS_TIMEOUT="${TOKENMILL_SCHEMATHESIS_TIMEOUT:-600}" PYTHONPATH="$PWD" OMP_NUM_THREADS=1 \
    python3 -m pytest -q -s -n 0 tests/server/test_schemathesis.py "$@"
