"""`python -m edgemoe_cli.cli`: the same as the `edgemoe` command."""

from . import main

main()
