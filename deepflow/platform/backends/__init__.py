"""Where TE processes run: the seam between the cluster manager's decisions and the machines.

The CM decides (`cluster/lifecycle.py`, the autoscaler); a `TEBackend` only starts, stops and watches TE
incarnations: `local` (subprocesses of the CM's host, today's default) and `ray` (named detached actors on
a Ray cluster, each holding its TE process on the node Ray placed it on). Both run the same
`python -m deepflow.platform.te` command line.
"""

from deepflow.platform.backends.base import TEBackend, TEHandle, TELaunch, te_command
from deepflow.platform.backends.local import LocalBackend

__all__ = ["LocalBackend", "TEBackend", "TEHandle", "TELaunch", "te_command"]
