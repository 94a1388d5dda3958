"""Trim a recorded graph of the operations a Pyro program's bookkeeping leaves, changing no value or draw."""
from __future__ import annotations

import operator

import torch
from torch import fx
from torch.utils import _pytree as pytree

# x - 0, x * 1 and x / 1 are x bit for bit (x + 0 is not: -0.0 + 0 is +0.0)
_IDENTITY = {torch.ops.aten.sub.Tensor: 0, torch.ops.aten.mul.Tensor: 1, torch.ops.aten.div.Tensor: 1}


def _mutates(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable


def _stateful(node: fx.Node) -> bool:
    """A call that is not a tensor op: grad-mode or autocast switches, which order the graph."""
    return node.op == "call_function" and not isinstance(node.target, torch._ops.OpOverload) \
        and node.target is not operator.getitem


def _keep(node: fx.Node) -> bool:
    """Whether a node must stay even with no users: it mutates, draws random numbers, or switches a mode."""
    t = node.target
    return node.op != "call_function" or _mutates(node) or _stateful(node) or (
        isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags)


def simplify(gm: fx.GraphModule) -> int:
    """Drop the operations a recorded Pyro program does not need; returns how many were dropped.

    Pyro's bookkeeping leaves ``x + 0``, ``x / 1``, the same reduction twice and results nobody
    reads. Removing them changes no value (x / 1 is x, bit for bit) and no random draw (ops that
    draw are kept). Only when every mutation in the graph is of a fresh tensor read by that mutation
    alone (``normal_`` of a new ``empty``), so no value can change between two reads of it; tensors
    that are mutated or made from nothing (``empty``, ``zeros``) are never merged; and with a grad-mode
    switch in the graph (a ``no_grad`` block) only unread results are dropped.
    """
    graph = gm.graph
    before = len(graph.nodes)
    if any(_mutates(n) and not (isinstance(n.args[0], fx.Node) and len(n.args[0].users) == 1)
           for n in graph.nodes if n.op == "call_function"):
        return 0
    mutated = {n.args[0] for n in graph.nodes if n.op == "call_function" and _mutates(n)}
    modal = any(_stateful(n) for n in graph.nodes)
    for n in graph.nodes:
        if modal or n.op != "call_function" or n.target not in _IDENTITY or n.kwargs or len(n.args) != 2:
            continue
        x, c = n.args
        if isinstance(x, fx.Node) and type(c) in (int, float) and c == _IDENTITY[n.target]:
            a, out = x.meta.get("val"), n.meta.get("val")
            if a is not None and out is not None and a.dtype == out.dtype and a.shape == out.shape \
                    and not any(_mutates(u) for u in n.users):
                n.replace_all_uses_with(x)
    seen: dict = {}
    for n in graph.nodes:
        if modal or _keep(n) or n in mutated or not any(isinstance(a, fx.Node) for a in n.all_input_nodes):
            continue
        try:
            key = (n.target, pytree.tree_map(lambda v: tuple(v) if isinstance(v, list) else v, (n.args, n.kwargs)))
            hash(key)
        except TypeError:
            continue
        if key in seen:
            n.replace_all_uses_with(seen[key])
        else:
            seen[key] = n
    changed = True
    while changed:
        changed = False
        for n in reversed(graph.nodes):
            if not n.users and not _keep(n):
                graph.erase_node(n)
                changed = True
            elif not n.users and _mutates(n) and isinstance(n.args[0], fx.Node) \
                    and n.args[0].target == torch.ops.aten.lift_fresh_copy.default:
                source = n.args[0]  # a copy of a constant, mutated (detach_) and never read
                graph.erase_node(n)
                graph.erase_node(source)
                changed = True
    graph.lint()
    gm.recompile()
    return before - len(graph.nodes)
