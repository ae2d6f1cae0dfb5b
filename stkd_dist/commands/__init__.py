"""One module per ``stkd`` subcommand; each exposes ``register(subparsers)``.

A module adds its parser with ``set_defaults(func=run)`` where ``run(args) -> int`` returns the exit
status. Keep argument parsing here and the work in the library modules.
"""
