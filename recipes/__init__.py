"""The shipped recipes (TOML), installed as the package ``rsq.recipes``; read with importlib.resources."""
