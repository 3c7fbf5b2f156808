"""Sweeps: hyper-parameter grids and evaluation protocols (VTAB-1k), run by an executor, reported with the published
numbers beside them.

``grid`` (grid files -> points), ``protocol`` (stages, their splits, scoring), ``spec`` (what a sweep is, kept as
``sweep.yaml``, checked against its declared fields), ``tasks`` (task names and sets), ``plan`` (the runs of a spec,
stage 2's choice), ``runs`` (a run's identity, folder, status and the worker entry ``execute``), ``executors``
(local process pool, submitit, Ray), ``driver`` (check, run what is missing), ``report`` / ``published`` (tables and
plot). The command is ``visionpeft sweep`` (``visionpeft/cli/sweep.py``).
"""
