"""The Redis Lua scripts of chatpipe/state.py, one file each under chatpipe/lua/: what a script
does, then its KEYS and ARGV by name, then its body (as arq/lua.py keeps its scripts)."""

from __future__ import annotations

from importlib import resources


def load_script(name: str) -> str:
    """The text of chatpipe/lua/{name}.lua (shipped in the package)."""
    return resources.files("chatpipe").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
