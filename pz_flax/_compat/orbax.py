"""Private details of Orbax that pz_flax depends on, each in one guarded place.

Rules for every entry in this module:

* a comment says why the private route is needed (what public API is missing) and since which
  release the assumption holds;
* the access is guarded: when a release breaks the assumption, the code falls back to a public
  route or raises an error that names the assumption and this module;
* a canary test in ``tests/_compat/`` checks the assumption against the installed release and
  fails with a message naming it.
"""

from __future__ import annotations
