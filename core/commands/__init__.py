"""One module per ``ctlab`` subcommand; each defines ``register(subparsers)``. ``_*.py`` are shared helpers."""
