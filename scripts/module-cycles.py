#!/usr/bin/env python3
"""Lists import cycles between the engine's modules (one node per file under src/), from the
`crate::a::b` paths each file names. Exit 1 when there is a cycle. Used by tests/architecture.rs."""
import pathlib, re, sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "src")
mods = {}
for p in root.rglob("*.rs"):
    rel = p.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts == ["lib"]:
        continue
    mods["::".join(parts)] = p


def resolve(path):
    # The longest known module prefix of a crate path.
    parts = path.split("::")
    for n in range(len(parts), 0, -1):
        m = "::".join(parts[:n])
        if m in mods:
            return m
    return None


edges = {m: set() for m in mods}
for m, p in mods.items():
    text = re.sub(r"//.*", "", p.read_text())
    # `use crate::a::{b, c::d}` → each full path; plain `crate::a::b` references too.
    for g in re.finditer(r"crate::((?:[a-z_0-9]+::)*)\{([^}]*)\}", text):
        for item in g.group(2).split(","):
            item = item.strip().split(" as ")[0]
            if item:
                t = resolve(g.group(1) + item)
                if t and t != m:
                    edges[m].add(t)
    for r in re.finditer(r"crate::((?:[a-z_0-9]+)(?:::[a-zA-Z_0-9]+)*)", text):
        t = resolve(r.group(1))
        if t and t != m:
            edges[m].add(t)

# Tarjan's strongly connected components.
index, low, stack, on, sccs, i = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)


def visit(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))


for v in sorted(edges):
    if v not in index:
        visit(v)
for c in sccs:
    print("cycle:", " <-> ".join(c))
print(f"{len(mods)} modules, {sum(len(e) for e in edges.values())} edges, {len(sccs)} cycles")
sys.exit(1 if sccs else 0)
