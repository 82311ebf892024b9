"""The sensor: bpf/sensor.c loaded, scoped to the watched processes, its records as `Event`s.

Scope lives in the kernel (watched cgroups as (depth, id) pairs, plus a tracked-pid set
that follows descendants), so an unwatched process costs one scope check per syscall and emits
nothing. Paths are resolved in userspace by `procfs.ProcModel` (see its docstring).

  loader     compile and load bpf/sensor.c, failure messages, tracepoint helpers
  transport  the perf buffers: draining, lost counts, poll()'s time cut, SensorStats
  decode     Decoder: raw record -> Event (layouts, comm cache, open flags -> access)
  procfs     the one /proc parser and the process model (cwd, fds) paths resolve against
  kernel     Sensor: the loaded object and its maps, composed of a transport and a decoder
"""

from .decode import DecodeError
from .kernel import Sensor
from .loader import SOURCE, SensorError, load_programs, object_programs, programs_of
from .procfs import descendants
from .transport import SensorStats

__all__ = [
    "SOURCE",
    "DecodeError",
    "Sensor",
    "SensorError",
    "SensorStats",
    "descendants",
    "load_programs",
    "object_programs",
    "programs_of",
]
