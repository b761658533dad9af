"""Cluster batch jobs and their evaluation: `consistory batch` and `consistory eval`.

A package of its own because it runs on Ray; the `consistory` library never imports Ray. The
`consistory` command finds the two commands through the `consistory.commands` entry points
(`command.py`, which imports nothing heavy); Ray, boto3 and the scorers load only when one runs.
"""
