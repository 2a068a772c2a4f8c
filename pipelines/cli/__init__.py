"""The `qarm` command line: the dispatcher (`main`), exit codes and the flag dialect. Nothing below `pipelines.cli`
imports it; it imports the jobs."""
from pipelines.cli.dispatch import COMMANDS, main
from pipelines.jobs.outcome import (EXIT_ERROR, EXIT_LOCKED, EXIT_OK, EXIT_REJECTED, EXIT_USAGE, CommandExit,
                                    configure_logging)

__all__ = ["main", "CommandExit", "COMMANDS", "configure_logging", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE",
           "EXIT_REJECTED", "EXIT_LOCKED"]
