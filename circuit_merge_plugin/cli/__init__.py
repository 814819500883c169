"""The ``circuit-merge`` command line (front end): the original script's command,
its request and job, raw-tensor merges, the self test and the subcommands.
"""
