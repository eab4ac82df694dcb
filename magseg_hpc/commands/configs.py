"""magseg-hpc configs [NAME]: the shipped experiment configs, usable by name from any folder."""

from __future__ import annotations

from magseg_hpc.config import read_config_text, shipped_configs


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "configs", help="list the shipped experiment configs (train --config NAME)",
        description="List the configs that come with magseg-hpc, with the first line of each; "
        "with NAME, print that config (a start for your own: copy it and edit).",
    )
    p.add_argument("name", nargs="?", help="print this config in full")
    p.set_defaults(func=run)


def summary(path) -> str:
    """The first comment line of a config: what it is for."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and line.strip("# "):
            return line.lstrip("# ").strip()
    return ""


def run(args) -> int:
    if args.name:
        print(read_config_text(args.name)[1], end="")  # a folder or binary file: one line
        return 0
    configs = shipped_configs()
    width = max(map(len, configs))
    for name, path in configs.items():
        print(f"{name:<{width}}  {summary(path)}")
    print(f"\nuse one by name: magseg-hpc train --config NAME ...  (files in {path.parent})")
    return 0
