"""The local disk cache: complete copies of objects, write staging, eviction (see states.py for the
state machine of a file row, and core.py for the object the rest of the mount calls)."""

from .core import Cache
from .download import FIRST_RANGE, HASH_STEP
from .evict import INLINE_UNLINKS, LOW_WATERMARK
from .policy import Klass
from .store import Download, Limits, Writer

__all__ = [
    "FIRST_RANGE",
    "HASH_STEP",
    "INLINE_UNLINKS",
    "LOW_WATERMARK",
    "Cache",
    "Download",
    "Klass",
    "Limits",
    "Writer",
]
