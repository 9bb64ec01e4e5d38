"""FANNY field kit client.

This package imports nothing on purpose: the broker imports :mod:`fanny_tui.protocol`
without pulling in Textual, aiortc or any I/O.
"""
