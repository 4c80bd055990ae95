"""Hooks for tests/test_multihost.py's processes, loaded by putting this folder on PYTHONPATH.

Compilation cache: JAX writes persistent-cache entries from process 0 only (to spare shared
file systems concurrent writers), and on CPU the other processes' cache keys differ from process
0's (their compile options and device descriptions name their own devices), so every launch
recompiled everything on process 1. On one machine with a local cache directory each process
may write its own entries: relaunches of a program then load it on every process.

Preemption: with DIFFLAX_TEST_SIGTERM_STEP=k in the environment, the process started with
--process_id=DIFFLAX_TEST_SIGTERM_PROCESS (default 1) sends itself a real SIGTERM as it fetches
the batch of training step k (as a preempted host would receive it mid-run); the other processes
get no signal. Nothing happens without the variable.
"""
import os
import sys

from jax._src import compilation_cache as _cc
from jax._src import compiler as _compiler
from jax._src import config as _config


def _cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
  # jax._src.compiler._cache_write without its `process_id != 0` early return.
  if host_callbacks or compile_time_secs < _config.persistent_cache_min_compile_time_secs.value:
    return
  _cc.put_executable_and_time(cache_key, module_name, executable, backend,
                              int(compile_time_secs))


_compiler._cache_write = _cache_write

_STEP = os.environ.get("DIFFLAX_TEST_SIGTERM_STEP")
_PROCESS = os.environ.get("DIFFLAX_TEST_SIGTERM_PROCESS", "1")

if _STEP and f"--process_id={_PROCESS}" in sys.orig_argv:
  import signal

  from difflax import data as _data

  _real = _data.make_iterator

  def _make_iterator(*args, **kwargs):
    it = _real(*args, **kwargs)
    if "start_step" not in kwargs:  # Eval iterators: untouched.
      return it

    def gen():
      for i, batch in enumerate(it):
        if kwargs["start_step"] + i + 1 == int(_STEP):
          os.kill(os.getpid(), signal.SIGTERM)
        yield batch
    return gen()

  _data.make_iterator = _make_iterator
