"""aiocomm's launcher: ``aiocomm-launch -n N script.py`` (also ``python -m launcher``)."""

from .job import JobResult, RankProcess, run_job

__all__ = ["JobResult", "RankProcess", "run_job"]
