"""One module per ``ctlab`` subcommand; each defines ``register(subparsers)``."""
