"""Evolutionary merge search: genome -> recipe -> candidate model -> score -> optimizer."""
