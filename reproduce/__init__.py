"""Reproductions of the four papers, one thin module per paper (see ``reproduce.cli``)."""
