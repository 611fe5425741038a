"""Triton kernels, one file per kernel family. Imported only when the triton backend runs."""
