"""Preemption hook for tests/test_multihost.py, loaded by putting this folder on PYTHONPATH.

With DIFFLAX_TEST_SIGTERM_STEP=k in the environment, the process started with
--process_id=DIFFLAX_TEST_SIGTERM_PROCESS (default 1) sends itself a real SIGTERM as it fetches
the batch of training step k (as a preempted host would receive it mid-run); the other processes
get no signal. Nothing happens without the variable.
"""
import os
import sys

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
