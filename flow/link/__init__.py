"""A user-space link shaper: latency, jitter, bandwidth, loss and outages on a loopback TCP path.

`LinkShaper` (a proxy running in a background thread) and the `Profile`s it applies; `flow link`
is its command line. Standard library only, so a device install can run it.
"""

from flow.link.profiles import PROFILES, Profile, profile_named
from flow.link.proxy import ConnectionStats, LinkShaper

__all__ = ["PROFILES", "Profile", "profile_named", "LinkShaper", "ConnectionStats"]
