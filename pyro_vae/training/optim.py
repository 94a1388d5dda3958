"""Pyro's Adam, stepped by one ``torch.optim.Adam`` over all parameters instead of one per parameter."""
from __future__ import annotations

from typing import Iterable

import pyro
import torch
from pyro.optim import PyroOptim


class SharedAdam(PyroOptim):
    """``pyro.optim.Adam(optim_args, clip_args)`` with the same updates, in one optimizer call per step.

    ``pyro.optim.Adam`` builds a ``torch.optim.Adam`` per parameter and calls each in turn, which costs
    more Python than the update itself on small networks. Here one ``torch.optim.Adam`` holds a
    state per parameter (Adam's update is per parameter anyway), and each call steps exactly the
    parameters given, as Pyro does. Gradient clipping is per parameter, as in Pyro's ``clip_args``.
    ``get_state``/``set_state`` use Pyro's format, {param name: a one-parameter Adam state dict}, so
    checkpoints of either optimizer load into the other.
    """

    def __init__(self, optim_args: dict, clip_args: dict | None = None) -> None:
        super().__init__(torch.optim.Adam, dict(optim_args), clip_args)
        self._adam: torch.optim.Adam | None = None
        self._stepped: tuple | None = None

    def __call__(self, params: Iterable[torch.Tensor], *args, **kwargs) -> None:
        if not isinstance(params, tuple):
            params = tuple(params)
        if params is not self._stepped:
            self._take(params)
        clip = self.pt_clip_args
        if clip:
            for p in params:
                self._clip_grad(p, **clip)
        self._adam.step(*args, **kwargs)

    def _take(self, params: tuple) -> None:
        if self._adam is None:
            # foreach: the multi-tensor update, the same values as the per-tensor loop Pyro's Adam runs on the
            # CPU (tests/test_replay.py checks bit for bit) in fewer calls: ~0.2 ms less per step here
            self._adam = torch.optim.Adam(list(params), **{"foreach": True, **self.pt_optim_args})
        store = pyro.get_param_store()
        for p in params:
            if p not in self._adam.state:
                waiting = self._state_waiting_to_be_consumed.pop(store.param_name(p), None)
                if waiting is not None:
                    one = torch.optim.Adam([p], **self.pt_optim_args)
                    one.load_state_dict(waiting)  # casts the saved state to p's dtype and device
                    self._adam.state[p] = one.state[p]
        self._adam.param_groups[0]["params"] = list(params)
        self._stepped = params

    def get_state(self) -> dict:
        state = dict(self._state_waiting_to_be_consumed)
        if self._adam is not None:
            store = pyro.get_param_store()
            for p, s in self._adam.state.items():
                one = torch.optim.Adam([p], **self.pt_optim_args)
                one.state[p] = s
                state[store.param_name(p)] = one.state_dict()
        return state

    def set_state(self, state_dict: dict) -> None:
        self._state_waiting_to_be_consumed.update(state_dict)
        if self._adam is not None:  # the given parameters take the new state when next stepped
            store = pyro.get_param_store()
            for p in [p for p in self._adam.state if store.param_name(p) in state_dict]:
                del self._adam.state[p]
            self._stepped = None
