"""Test-suite setup shared by every test module.

Multi-device code is exercised on CPU: XLA must be told how many host devices
to fake before JAX is first imported, so this happens here, at collection time.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
