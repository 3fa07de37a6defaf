#!/usr/bin/env python3
"""Print the import graph of src/ and its circles (strongly connected components).

A module is a file under src/ (src/room.rs is `room`, src/room/plugin.rs is `room::plugin`).
An edge A -> B is any `crate::B...` path written in A (use statements and inline paths,
comments excluded), or `super::`/`self::` paths resolved the same way. `bench`, `client` and
their submodules are tools built on the library and are left out unless --all is given.

    scripts/import-cycles.py            # circles only; exit status 1 if there is one
    scripts/import-cycles.py --edges    # every edge, then the circles
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
TOOLS = {"bench", "client", "main"}


def modules():
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3]
            parts = rel.split(os.sep)
            if parts[-1] == "mod":
                parts = parts[:-1]
            if parts == ["lib"]:
                continue
            out["::".join(parts)] = os.path.join(dirpath, f)
    return out


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//")[0] for line in text.splitlines())


def resolve(path, names):
    """The longest known module that `path` (a list of segments) starts with."""
    for n in range(len(path), 0, -1):
        cand = "::".join(path[:n])
        if cand in names:
            return cand
    return None


def edges(mods, include_tools):
    names = set(mods)
    graph = {m: set() for m in names}
    for mod, file in mods.items():
        text = strip_comments(open(file, encoding="utf-8").read())
        here = mod.split("::")
        # `use crate::{a, b::c}` groups: expand one level of braces.
        for m in re.finditer(r"crate::\{([^}]*)\}", text):
            for item in m.group(1).split(","):
                seg = [s for s in item.strip().split("::") if s and s.isidentifier()]
                target = resolve(seg, names) if seg else None
                if target:
                    graph[mod].add(target)
        for m in re.finditer(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)", text):
            seg = m.group(2).split("::")[1:]
            base = {"crate": [], "super": here[:-1], "self": here}[m.group(1)]
            # `super::super::x`
            while seg and seg[0] == "super":
                base = base[:-1]
                seg = seg[1:]
            target = resolve(base + seg, names)
            if target:
                graph[mod].add(target)
    for m in graph:
        graph[m].discard(m)
        # A module may always reach into its own submodules, and a submodule into its parent
        # is a real edge (it is counted).
        graph[m] = {t for t in graph[m] if not t.startswith(m + "::")}
    if not include_tools:
        graph = {m: {t for t in ts if t.split("::")[0] not in TOOLS} for m, ts in graph.items() if m.split("::")[0] not in TOOLS}
    return graph


def sccs(graph):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    graph = edges(modules(), "--all" in sys.argv)
    if "--edges" in sys.argv:
        for m in sorted(graph):
            print(f"{m} -> {', '.join(sorted(graph[m])) or '-'}")
        print()
    circles = sccs(graph)
    for c in circles:
        print("circle:", " <-> ".join(c))
    if not circles:
        print("no import circles")
    sys.exit(1 if circles else 0)


if __name__ == "__main__":
    main()
