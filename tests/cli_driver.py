"""Runs many command lines of `python -m sae_cache` in one interpreter (startup is slow), as the tests' subprocess.

    python tests/cli_driver.py CASES.json RESULTS.json

CASES.json is a list of argument lists. For each, `sae_cache.cli.main(argv)` runs with file descriptor 2 sent to a
file of its own, so everything the case writes to stderr is captured: its error line, a logger's lines, a
traceback. RESULTS.json gets, per case, {"code": the exit code main returned (or null), "stderr": the text,
"raised": the traceback of an exception main let escape (or null)}: what `python -m sae_cache` would have shown.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path


def run_case(argv: list[str]) -> dict:
    from sae_cache import cli

    code, raised = None, None
    with tempfile.TemporaryFile("w+") as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            code = cli.main(argv)
        except BaseException:  # noqa: BLE001 - reported: the process would have died with a traceback
            raised = traceback.format_exc()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        return {"code": code, "stderr": err.read(), "raised": raised}


def main(argv: list[str]) -> int:
    cases = json.loads(Path(argv[1]).read_text())
    Path(argv[2]).write_text(json.dumps([run_case(case) for case in cases], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
