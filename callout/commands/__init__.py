"""One module per `callout` subcommand; `callout.cli` assembles them."""
