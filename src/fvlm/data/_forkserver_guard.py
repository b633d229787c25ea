"""Imported only as the first preload module of a forkserver started by :func:`fvlm.data.jobs.run_jobs`:
makes the forkserver die with the process that started it (Linux parent-death signal), so that a ``kill -9``
of the main process leaves no forkserver behind (the workers it forked follow it through their own signal)."""

from fvlm.data.jobs import set_parent_death_signal

set_parent_death_signal()
