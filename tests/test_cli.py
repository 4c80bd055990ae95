"""The command line: every mistake is one line and exit status 2 (no traceback, no page of
usage); --list_configs, --print_config and --dry_run answer without building anything."""
import json
import subprocess
import sys

import pytest

from conftest import REPO
from difflax import config as config_lib


def cli(*args):
  return subprocess.run([sys.executable, "-m", "difflax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,says", [
    ((), "missing --config"),
    (("--config=ddpm_cifar10:tiny",), "missing --workdir"),
    (("--config=ddpm_cifar10:tiny", "--workdir=W", "--modee=train"), "Did you mean: mode"),
    (("--config=ddpm_cifar10:tiny", "--workdir=W", "--distributed=yes"),
     "one of <auto|on|off>"),
    (("--config=ddpm_cifar10:tiny", "--workdir=W", "stray"), "unexpected argument(s) 'stray'"),
    (("--config=ddpm_cifar10:tny", "--workdir=W"), "valid presets: ['paper', 'tiny']"),
    (("--config=ddpm_cifar10:tiny", "--workdir=W", "--config.data.name=folder",
      "--config.data.folder=/nonexistent"), "is not a directory"),
    (("--config=ddpm_cifar10:tiny", "--workdir=W", "--config.data.name=folder",
      "--config.data.folder=/nonexistent", "--dry_run"), "is not a directory"),
])
def test_every_mistake_is_one_line_and_status_2_leaving_nothing(args, says, tmp_path):
  args = [a.replace("=W", f"={tmp_path / 'run'}") for a in args]
  r = cli(*args)
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("difflax: ") and says in lines[0], r.stderr
  assert not (tmp_path / "run").exists()  # Failed before writing config.json / checkpoints/.


def test_list_print_and_dry_run_build_nothing(tmp_path):
  r = cli("--list_configs")
  assert r.returncode == 0 and not r.stderr.strip(), r.stderr
  names = [line.split()[0] for line in r.stdout.splitlines()[:-1]]
  assert names == config_lib.packaged_names()
  assert "[paper, tiny]" in r.stdout and ":folder=PATH" in r.stdout
  # --print_config: the resolved config, presets and overrides applied, which loads back.
  r = cli("--config=ddpm_cifar10:tiny", "--config.optim.lr=3e-3", "--print_config")
  assert r.returncode == 0, r.stderr
  printed = config_lib.from_dict(json.loads(r.stdout))
  expected = config_lib.load("ddpm_cifar10:tiny", [("optim.lr", "3e-3")])
  assert printed.to_dict() == expected.to_dict() and printed.optim.lr == 3e-3
  r = cli("--config=cascade_32_64:tiny", f"--workdir={tmp_path / 'run'}", "--dry_run",
          "--mode=train,sample")
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines()[0].startswith("OK: --mode=train,sample")
  assert "base: 8x8, embedded data" in r.stdout and "sr_64: 16x16" in r.stdout
  assert not (tmp_path / "run").exists()


def test_a_second_run_into_a_busy_workdir_is_refused_at_once(tmp_path):
  """Two runs into one workdir would interleave checkpoints and metrics: the second one fails
  in one line naming the first (here: this process holding the lock), before writing anything;
  the OS releases the lock of a process that dies, so a killed run never blocks its resume."""
  import os
  from difflax import fileio, modes
  with fileio.exclusive(tmp_path / modes.LOCK_FILE, "test"):
    r = cli("--config=ddpm_cifar10:tiny", f"--workdir={tmp_path}", "--mode=train,sample")
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and f"is in use by pid {os.getpid()} on " in lines[0], r.stderr
  assert os.listdir(tmp_path) == [modes.LOCK_FILE]
