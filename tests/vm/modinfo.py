"""Read a kernel module's ``.modinfo`` section and order modules so dependencies load first."""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModuleTree", "read_modinfo"]

_ELF_MAGIC = b"\x7fELF"
_SOFTDEP_WORDS = re.compile(r"\b(?:pre|post):")


def read_modinfo(ko: Path) -> dict[str, list[str]]:
    """Return the ``key=value`` pairs of a 64-bit little-endian module's ``.modinfo`` section.

    Raise ValueError if the file is not such an ELF object or has no ``.modinfo`` section.
    """
    data = ko.read_bytes()
    if data[:4] != _ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{ko}: not a 64-bit little-endian ELF object")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = sections[shstrndx][4]
    for name_index, _type, _flags, _addr, offset, size in sections:
        end = data.index(b"\0", names_offset + name_index)
        if data[names_offset + name_index : end] == b".modinfo":
            return _parse_pairs(data[offset : offset + size])
    raise ValueError(f"{ko}: no .modinfo section")


def _parse_pairs(blob: bytes) -> dict[str, list[str]]:
    info: dict[str, list[str]] = {}
    for entry in blob.split(b"\0"):
        key, sep, value = entry.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def _canonical(name: str) -> str:
    return name.replace("-", "_")


@dataclass(frozen=True)
class ModuleTree:
    """The ``.ko`` files under one ``lib/modules/<version>`` folder, indexed by module name."""

    files: Mapping[str, Path]
    aliases: Mapping[str, tuple[str, ...]]

    @classmethod
    def scan(cls, modules_dir: Path, alias_dirs: Iterable[str] = ()) -> ModuleTree:
        """Index every module under ``modules_dir``; read aliases only under ``alias_dirs``.

        Softdeps name aliases (``crc32c``), not modules, and scanning the aliases of all
        4000 modules is slow, so only the named sub-folders (the crypto ones) are read.
        """
        files = {_canonical(ko.name.removesuffix(".ko")): ko for ko in modules_dir.rglob("*.ko")}
        aliases: dict[str, list[str]] = {}
        for sub in alias_dirs:
            for ko in sorted((modules_dir / sub).rglob("*.ko")):
                for alias in read_modinfo(ko).get("alias", []):
                    aliases.setdefault(alias, []).append(_canonical(ko.name.removesuffix(".ko")))
        return cls(files, {alias: tuple(names) for alias, names in aliases.items()})

    def resolve(self, name: str) -> str | None:
        """Return the module that provides ``name`` (a module name or an alias), or None.

        Among several providers of an alias the ``*_generic`` one wins: it needs no CPU feature
        that qemu's TCG CPU may lack.
        """
        canonical = _canonical(name)
        if canonical in self.files:
            return canonical
        providers = self.aliases.get(name, ())
        generic = [p for p in providers if p.endswith("_generic")]
        candidates = generic or list(providers)
        return candidates[0] if candidates else None

    def load_order(self, wanted: Iterable[str]) -> list[str]:
        """Return ``wanted`` plus everything they depend on, each after its dependencies.

        Dependencies come from each module's ``depends=`` string and ``softdep=`` aliases.
        Raise KeyError naming a wanted module or a hard dependency that is not in the tree.
        """
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str, required: bool) -> None:
            module = self.resolve(name)
            if module is None:
                if required:
                    raise KeyError(f"kernel module {name!r} is not in the tree")
                return
            if module in order or module in visiting:
                return
            visiting.add(module)
            info = read_modinfo(self.files[module])
            for depends in info.get("depends", []):
                for dep in filter(None, depends.split(",")):
                    visit(dep, required=True)
            for softdep in info.get("softdep", []):
                for dep in _SOFTDEP_WORDS.sub(" ", softdep).split():
                    visit(dep, required=False)
            visiting.discard(module)
            order.append(module)

        for name in wanted:
            visit(name, required=True)
        return order
