#!/usr/bin/env bash
# CI: point DVC at the shared remote named by the repository secrets, and check that it answers.
#   KILN_DVC_REMOTE_URL    e.g. s3://my-bucket/kiln. Unset: the committed default remote, the folder
#                          kiln-remote beside the checkout (kept between runs on a self-hosted runner;
#                          created empty on a runner's first run)
#   KILN_DVC_ENDPOINT_URL  optional: the URL of an S3-compatible service (MinIO, Ceph, R2...)
# Written with --local (.dvc/config.local, git-ignored): the committed .dvc/config stays as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PATH="$PWD/.venv/bin:$PATH"
if [ -n "${KILN_DVC_REMOTE_URL:-}" ]; then
    dvc remote add --local --force --default ci "$KILN_DVC_REMOTE_URL"
    if [ -n "${KILN_DVC_ENDPOINT_URL:-}" ]; then
        dvc remote modify --local ci endpointurl "$KILN_DVC_ENDPOINT_URL"
    fi
    python scripts/check_remote.py
else
    python scripts/check_remote.py --create-local
fi
