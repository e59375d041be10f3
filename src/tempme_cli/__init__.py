"""The ``tempme`` command line: one command, thin subcommands over the library."""
