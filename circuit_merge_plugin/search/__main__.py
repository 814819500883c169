"""``python -m circuit_merge_plugin.search``: the ``circuit-merge search`` command."""

from circuit_merge_plugin.search.command import PROG, search

if __name__ == "__main__":
    search.main(prog_name=PROG)
