"""Test-session settings shared by tests/ and the doctests in zojax/.

The suite compiles many small programs and runs each for a few steps, so it
spends most of its time in XLA's CPU backend. These flags turn off backend
optimisation and the fusion emitters: the partitioned, fused HLO programs
(what the tests check) are unchanged and only the machine code is less
optimised; compilation gets about 4x cheaper here. Benchmarks do not use
them.
"""

import os

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"

if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
