"""Bundled tasks with programmatic ground truth, for demos and end-to-end tests.

* :mod:`alignd.tasks.sentiment`: make one-sentence answers more positive (lexicon oracle).
"""
