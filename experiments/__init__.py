"""Experiment scripts: each is one command that writes tables, figures and raw numbers to a directory.

See ``experiments/README.md`` for the list, the commands and what each shows.
"""
