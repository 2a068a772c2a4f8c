"""The `qarm` subcommands that front the library packages (feature_store, quant, ranker): argument parsing,
data loading, and the call into the library. Libraries never import these."""
