"""What every stage script shares: logging to the stage's log, and one clear line on a user error or a storage failure."""

from __future__ import annotations

import logging
import sys
from typing import Callable


def run_stage(main: Callable[[], None]) -> None:
    # Kiln's own progress at INFO; other libraries (onnxscript, DVC) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("kiln").setLevel(logging.INFO)
    try:
        from .params import check_fresh

        check_fresh()
        main()
    except KeyboardInterrupt:
        print("kiln: interrupted; no output was written", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        from .errors import user_message

        # A full disk or a failing one is named as such, whatever the library that hit it made of it.
        message = user_message(e)
        if message is None:
            raise
        print(f"kiln: error: {message}", file=sys.stderr)
        sys.exit(1)
