"""The packaged experiment configs: `get_config(arg)` files, loaded by name or path with
`difflax.config.load("cascade_32_64:tiny")` or `--config=cascade_32_64` on the command line. In a
clone, `configs/` at the repository root is a link to this folder, so `--config=configs/X.py`
works too."""
