"""The transport layer: the only code that touches sockets (see :mod:`.mesh`)."""

from .matching import byte_view
from .mesh import Mesh
from .stream import PeerStream
from .waits import Op, Wait

__all__ = ["Mesh", "PeerStream", "Op", "Wait", "byte_view"]
