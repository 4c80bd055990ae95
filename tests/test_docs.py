"""The README and docs as a new user reads them: the two commands are the ones CI and the main job
run, every config a command names exists, every relative link (and its #anchor) resolves, no
page points outside the repository, and the README stays short."""
import glob
import os
import re

import pytest

from conftest import REPO

PAGES = sorted(["README.md", "CONTRIBUTING.md", "CHANGELOG.md", "launch/README.md",
                *(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/**/*.md",
                                                              recursive=True))])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def read(page):
  return open(os.path.join(REPO, page)).read()


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
  return text.replace(" ", "-")


def anchors(page):
  return {slug(m) for m in re.findall(r"^#+ (.+)$", read(page), re.M)}


def test_readme_is_short_and_has_no_placeholders():
  text = read("README.md")
  assert len(text.splitlines()) <= 300
  for page in PAGES:
    placeholders = r"\b(PLAN_TABLE|PLAN_SUMMARY|QUALITY_EXAMPLE|TEST_SUITE_TIME|PLANS)\b"
    assert not re.search(placeholders, read(page)), page
    outside = os.path.join("..", "shared")  # The team's reference folder beside the clone.
    assert outside not in read(page), f"{page} points outside the repository"


def test_the_two_commands_are_what_ci_and_the_main_job_run():
  blocks = re.findall(r"```bash\n(.*?)```", read("README.md"), re.S)
  commands = [l for b in blocks for l in b.splitlines() if l.startswith("python3 -m venv")]
  main, test = commands[0], commands[1]
  ci = [l for l in read(".ci/run").splitlines() if l.startswith("python3 -m venv")]
  assert ci == [test]
  config = re.search(r"--config=(\S+)", main)[1]
  assert os.path.exists(os.path.join(REPO, config)), config
  assert "--mode=train,sample" in main and "pip install -e ." in main


def test_every_config_a_command_names_exists():
  from difflax import config as config_lib
  names = set()
  for page in PAGES:
    for packaged, bare in re.findall(r"--config=(?:configs/([a-z0-9_]+)\.py|([a-z0-9_]+)[:\s`])",
                                     read(page)):
      names.add(packaged or bare)
  assert names, "no --config= found"
  assert names <= set(config_lib.packaged_names()), names - set(config_lib.packaged_names())


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_and_anchors_resolve(page):
  for target in LINK.findall(read(page)):
    if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
      continue
    path, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    assert os.path.exists(os.path.join(REPO, resolved)), f"{page}: {target}"
    if anchor and resolved.endswith(".md"):
      assert anchor in anchors(resolved), f"{page}: #{anchor} not a heading of {resolved}"


def test_figure_script_writes_its_figures(tmp_path):
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, os.path.join(REPO, "docs", "make_figures.py"),
                         f"--out={tmp_path}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  written = sorted(os.listdir(tmp_path))
  assert written == ["embedded_plain.png", "embedded_textured.png", "noise_schedules.png"]
  for name in written:  # The committed copies exist (the pages show them).
    assert os.path.exists(os.path.join(REPO, "docs", "images", name)), name


def test_slug_matches_github():
  assert slug("Planning a pod run (`--mode=plan`)") == "planning-a-pod-run---modeplan"
  assert slug("The papers' runs on pods") == "the-papers-runs-on-pods"
