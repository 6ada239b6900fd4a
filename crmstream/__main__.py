"""``python -m crmstream``: the same as the ``crmstream`` command."""

from crmstream.cli import main

main()
