"""magseg-hpc configs [NAME]: the shipped experiment configs, usable by name from any folder."""

from __future__ import annotations

import re
import shutil
import textwrap

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
    """What a config is for: the first sentence of its header comment, whole (it may run
    over several comment lines)."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        text = line.lstrip("#").strip() if line.startswith("#") else None
        if not text:  # the paragraph (or the comment) ends
            if words or text is None:
                break
            continue
        words += text.split()
        sentence = re.match(r"(.*?[.!?])(\s|$)", " ".join(words))
        if sentence:
            return sentence.group(1)
    return " ".join(words)


def run(args) -> int:
    if args.name:
        print(read_config_text(args.name)[1], end="")  # a folder or binary file: one line
        return 0
    configs = shipped_configs()
    width = max(map(len, configs))
    columns = max(60, shutil.get_terminal_size((100, 24)).columns - 1)
    for name, path in configs.items():
        print(textwrap.fill(summary(path), columns, initial_indent=f"{name:<{width}}  ",
                            subsequent_indent=" " * (width + 2), break_on_hyphens=False))
    print(f"\nuse one by name: magseg-hpc train --config NAME ...  (files in {path.parent})")
    return 0
