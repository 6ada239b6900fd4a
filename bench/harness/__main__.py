"""``python -m crmstream.bench.harness``: the harness, or one of its child roles."""

from crmstream.bench.harness.cli import main

main()
