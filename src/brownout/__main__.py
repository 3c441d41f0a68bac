"""``python -m brownout`` runs the command line."""

from brownout.cli import main

main()
