"""``python -m batchq``."""

from batchq.cli import main

main()
