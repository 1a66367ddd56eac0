"""Type aliases shared by the kernels' wrappers and the indexes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

#: progress(done): called now and then (at most ~5 times a second) with the work done so far
#: (queries searched, picks made); a false return value stops the work.
Progress = Optional[Callable[[int], object]]
