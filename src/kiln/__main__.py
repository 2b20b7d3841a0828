"""`python -m kiln <verb>`: the `kiln` command (kiln.cli.main)."""

from kiln.cli.main import entry

entry()
