"""``python -m brownout`` runs the command line (the same front door as the ``brownout`` script)."""

from brownout._entry import main

main()
