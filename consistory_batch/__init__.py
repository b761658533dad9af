"""Cluster batch jobs and their evaluation: `consistory batch` and `consistory eval`.

A package of its own because it runs on Ray; the `consistory` library never imports Ray, and
its command line loads this package only when one of these two commands runs.
"""
