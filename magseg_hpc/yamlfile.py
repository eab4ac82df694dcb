"""Reading YAML written by people: configs, job profiles, mask colour tables."""

from __future__ import annotations

import yaml


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases (``*name``): no config needs them, and a few nested
    aliases expand to billions of nodes (a "billion laughs" file). A key given twice in one
    mapping is refused too: safe_load keeps the last silently, so the first edit is lost."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not accepted; write the "
                "values out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    line = first.get(key)
                except TypeError:  # an unhashable key: construct_mapping says so
                    continue
                if line is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (line {line + 1} and line "
                        f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(text: str):
    """``yaml.safe_load`` that refuses aliases; raises yaml.YAMLError like safe_load."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
