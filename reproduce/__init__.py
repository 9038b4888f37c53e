"""Reproductions of the four papers, a thin module or subpackage each (see ``reproduce.cli``)."""
