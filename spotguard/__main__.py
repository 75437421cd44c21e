"""``python -m spotguard``: the command line (how the daemon starts the gate process)."""

from spotguard.cli import main

main()
