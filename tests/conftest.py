"""Test setup: 8 fake CPU devices (set before JAX is imported) and shared tiny configs."""
import os
import sys

# Tests run tiny models for a few steps: compile time dominates, so LLVM optimises little
# (about half the compile time) and fusions are emitted by XLA:CPU's classic elemental emitters
# rather than its MLIR fusion emitters (another ~40 % off: 3.0 vs 5.0 s for a tiny fsdp train
# step of 774 / 838 fusions). Equalities in the tests compare runs made with the same flags;
# subprocesses (CLI, launch/local.sh) inherit them.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Identical programs compiled by several tests (and their CLI subprocesses) compile once; every
# program is cached however fast it compiled, since tests and relaunches share many small ones
# (init, checksums, sampling steps), each costing a compile per process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.expanduser("~"), ".cache", "difflax-test-jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import difflax  # noqa: E402,F401  (its XLA:CPU defaults join XLA_FLAGS before the backend starts)
import jax  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def load_config(name: str, arg: str = "tiny"):
  """The packaged config `name:arg` (the CLI's loader) with every optional key, unlocked for the
  test to edit."""
  from difflax import config as config_lib
  return config_lib.complete(config_lib.load(f"{name}:{arg}"))  # (every key, to edit)


@pytest.fixture
def tiny_config():
  """The ddpm tiny preset shrunk further: 8x8 images, 8 channels, one device unless a test
  asks for the mesh."""
  c = load_config("ddpm_cifar10", "tiny")
  c.train.preview_every = 0
  return c


def pytest_configure(config):
  assert jax.device_count() == 8, "tests expect 8 fake CPU devices (XLA_FLAGS set in conftest)"
