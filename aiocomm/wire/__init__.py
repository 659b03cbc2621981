"""The wire layer: pure, no asyncio and no sockets.

:mod:`.frames` is the frame format and the zero-copy frame reader;
:mod:`.handshake` is the handshake as a state machine.  Both are re-exported
here, so ``from aiocomm import wire`` gives the whole layer.
"""

from .frames import *  # noqa: F403
from .handshake import *  # noqa: F403
