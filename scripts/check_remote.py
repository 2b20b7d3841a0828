"""Check that a DVC remote can be reached, in seconds and with one clear line when it cannot.

    python scripts/check_remote.py            # the default remote (core.remote)
    python scripts/check_remote.py storage    # a named remote
    python scripts/check_remote.py --create-local   # an empty local folder is fine: created if missing

CI runs this before `dvc pull` / `dvc push`: DVC's own answer to an S3 endpoint that does not
answer comes after minutes of retries, and to a missing local remote folder it says only that
cache files are "missing", as if nobody had pushed. Exit status 0: reachable; 1: not, with the
reason on stderr; 2: no such remote. Remote kinds other than local folders and S3 are not checked.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping
from urllib.parse import urlparse

TIMEOUT_S = 5


class Unreachable(Exception):
    pass


def check_local(path: str, create: bool = False) -> str:
    if create and not os.path.exists(path):
        os.makedirs(path)
        return f"folder {path} (created: empty until the first `dvc push`)"
    if not os.path.isdir(path):
        raise Unreachable(
            f"folder {path} does not exist (`dvc push` creates it; to pull, point the remote at the folder "
            f"that holds the cache: `dvc remote modify --local {{name}} url PATH`)"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise Unreachable(f"folder {path} is not readable by this user")
    return f"folder {path}"


def check_s3(conf: Mapping[str, Any]) -> str:
    try:
        import botocore.session
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError
    except ImportError as e:
        raise Unreachable("DVC's S3 support is not installed: pip install dvc-s3") from e
    url = urlparse(conf["url"])
    bucket = url.netloc
    endpoint = conf.get("endpointurl")
    session = botocore.session.Session(profile=conf.get("profile"))
    client = session.create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=conf.get("region"),
        aws_access_key_id=conf.get("access_key_id"),
        aws_secret_access_key=conf.get("secret_access_key"),
        aws_session_token=conf.get("session_token"),
        verify=conf.get("ssl_verify", True),
        config=Config(connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S, retries={"max_attempts": 1}),
    )
    where = endpoint or "AWS S3"
    try:
        client.head_bucket(Bucket=bucket)
    except EndpointConnectionError as e:
        raise Unreachable(f"cannot connect to {where} ({e}); check the remote's endpointurl and that the service is up") from e
    except NoCredentialsError as e:
        raise Unreachable(
            "no credentials for S3: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (in CI, from the repository "
            "secrets; see docs/remote.md), or `dvc remote modify --local NAME profile ...`"
        ) from e
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise Unreachable(f"bucket '{bucket}' does not exist at {where}") from e
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise Unreachable(f"access to bucket '{bucket}' at {where} denied ({code}): check the credentials") from e
        raise Unreachable(f"bucket '{bucket}' at {where}: {e}") from e
    except BotoCoreError as e:
        raise Unreachable(f"{where}: {e}") from e
    return f"bucket '{bucket}' at {where}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("remote", nargs="?", help="remote name (default: the repository's default remote)")
    parser.add_argument(
        "--create-local", action="store_true", help="create a local-folder remote that does not exist yet (a CI runner's first run)"
    )
    args = parser.parse_args(argv)

    from dvc.repo import Repo

    with Repo(".") as repo:
        remotes = repo.config.get("remote", {})
        name = args.remote or repo.config["core"].get("remote")
        if not name or name not in remotes:
            known = ", ".join(sorted(remotes)) or "none"
            what = f"no remote named '{name}'" if name else "no default remote (core.remote)"
            print(f"kiln: error: {what}; remotes configured: {known} (see docs/remote.md)", file=sys.stderr)
            return 2
        conf = dict(remotes[name])
        scheme = urlparse(conf["url"]).scheme
        try:
            if scheme in ("", "file") or os.path.isabs(conf["url"]):
                where = check_local(repo.cloud.get_remote(name).path, create=args.create_local)
            elif scheme == "s3":
                where = check_s3(conf)
            else:
                print(f"DVC remote '{name}' ({scheme}) not checked: kiln checks local folders and S3 only")
                return 0
        except Unreachable as e:
            print(f"kiln: error: DVC remote '{name}' is unreachable: {str(e).replace('{name}', name)}", file=sys.stderr)
            return 1
    print(f"DVC remote '{name}' is reachable: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
