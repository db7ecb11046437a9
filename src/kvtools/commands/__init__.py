"""The tools' subcommands of the `kvindex` script (`demo`, `analyze`), registered beside the
library's own by `kvtools.cli`."""
