"""`lota <stage> --help`: what a stage does and writes, its config groups, and every key it reads with its
current value and meaning (from the schemas' `opt(default, help)`)."""

from __future__ import annotations

import dataclasses
import typing

from lota_cli.cli._stages import STAGES


def stage_help(stage: str, overrides: list[str]) -> str:
    """What the stage does and writes, its config groups, and every key it reads with its value and meaning."""
    from hydra import compose, initialize_config_dir

    from lota_cli import config

    spec = STAGES[stage]
    overrides = [a for a in overrides if "=" in a and not a.startswith("-")]
    with initialize_config_dir(config_dir=str(config.CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=spec.module, overrides=overrides, return_hydra_config=True)
    schema = config.SCHEMAS[spec.module]
    usage_args = " A.safetensors B.safetensors ..." if spec.positional else ""
    lines = [f"lota {stage}: {spec.does}", f"writes: {spec.writes}", "",
             f"usage: lota {stage}{usage_args} [key=value ...] [--cfg job] [-m key=a,b ...]"]
    groups = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra")}
    if groups:
        lines += ["", "config groups (group=option):"]
        for group, choice in groups.items():
            folder = group.split("@")[0]
            options = sorted(p.stem for p in (config.CONF_DIR / folder).glob("*.yaml"))
            lines.append(f"  {group:<16} {_show(choice):<14} options: {', '.join(options)}")
    rows = list(_key_rows(schema, cfg, ""))
    width = min(32, max(len(r[0]) for r in rows))
    value_width = min(28, max(len(r[1]) for r in rows))
    lines += ["", "keys (current value, meaning):"]
    for key, value, meaning in rows:
        value = value if len(value) <= value_width else value[:value_width - 3] + "..."
        lines.append(f"  {key:<{width}} {value:<{value_width}} {meaning}")
    if stage == "merge":
        from lota_cli.ops import methods_help

        lines += ["", "methods:"] + [f"  {line}" for line in methods_help().splitlines()]
    lines += ["", "Hydra: --cfg job prints the composed config; -m sweeps; --hydra-help for Hydra's own flags."]
    return "\n".join(lines)


def _key_rows(schema: type, node, prefix: str):
    """(key, value, meaning) for every key of a schema dataclass, groups flattened as group.key."""
    from omegaconf import OmegaConf

    hints = typing.get_type_hints(schema)
    values = OmegaConf.to_container(node, resolve=False) if node is not None else {}
    for f in dataclasses.fields(schema):
        if f.metadata.get("unread"):
            continue
        kind = _dataclass_in(hints[f.name])
        value = node.get(f.name) if node is not None and kind is not None else None
        if kind is not None and typing.get_origin(hints[f.name]) is dict:  # named tasks: their keys once
            names = ", ".join(value.keys()) if value else "-"
            yield f"{prefix}{f.name}", names, f.metadata.get("help", "")
            yield from _key_rows(kind, None, f"{prefix}{f.name}.NAME.")
        elif kind is not None and value is not None:
            yield from _key_rows(kind, value, f"{prefix}{f.name}.")
        elif kind is not None:
            yield f"{prefix}{f.name}", "null", f.metadata.get("help", "")
        else:
            shown = "" if node is None else _show(values.get(f.name))
            yield f"{prefix}{f.name}", shown, f.metadata.get("help", "")


def _dataclass_in(hint) -> type | None:
    """The dataclass a field holds (directly, as Optional[...] or as Dict[str, ...]), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
