"""aiocomm's launcher: ``aiocomm-launch -n N script.py``.

Installed as the package ``aiocomm_launch`` (``python -m aiocomm_launch``);
in a checkout of the repository it is the folder ``launcher/`` (``python -m
launcher`` from the repository's root).  The modules import each other
relatively, so either name works.
"""

import os as _os


def _open_standard_fds() -> None:
    """Give a closed stdin/stdout/stderr /dev/null before anything else opens a
    file, so no socket or pipe of the launcher takes their numbers (a rank
    would read that as its stdin)."""
    while True:
        fd = _os.open(_os.devnull, _os.O_RDWR)
        if fd > 2:
            _os.close(fd)
            return
        _os.set_inheritable(fd, True)  # as standard descriptors are


_open_standard_fds()

from .job import JobResult, RankProcess, run_job  # noqa: E402 -- after _open_standard_fds(), on purpose

__all__ = ["JobResult", "RankProcess", "run_job"]
