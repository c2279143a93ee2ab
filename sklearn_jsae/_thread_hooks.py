"""Hooks on a user's model that act on the registering thread's forward passes only.

Harvests, streams, spliced scores and the hook-name probe hook the user's own model, which
other threads may run meanwhile (two harvests at once, a score beside a plain forward).  Their
hooks must neither change another thread's pass nor record it: each wrapper below returns None,
leaving the pass as it is, on any thread but the one that registered it.

A pre-hook with kwargs is registered by torch in two steps (the hook into
``module._forward_pre_hooks``, then its flag into ``_forward_pre_hooks_with_kwargs``) and
removed in two; a forward in another thread between the two steps calls it as
``hook(module, args)``.  A hook whose ``kwargs`` is required raised a TypeError inside that
thread's forward (seen once in CI: ``pre_hook() missing 1 required positional argument:
'kwargs'``), so the wrapper takes ``kwargs`` as optional.  The registering thread never sees
that window: it runs its forwards after the registration and removes the hooks after them.
"""

from __future__ import annotations

import threading


def this_threads_pre_hook(module, hook):
    """Register ``hook(module, args, kwargs)`` as a forward pre-hook of ``module`` (with kwargs)
    that acts on the calling thread's forwards only; returns torch's removable handle."""
    thread = threading.get_ident()

    def pre_hook(module, args, kwargs=None):
        if threading.get_ident() != thread:
            return None
        return hook(module, args, kwargs)

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def this_threads_forward_hook(module, hook):
    """Register ``hook(module, args, output)`` as a forward hook of ``module`` that acts on the
    calling thread's forwards only; returns torch's removable handle."""
    thread = threading.get_ident()

    def forward_hook(module, args, output):
        if threading.get_ident() != thread:
            return None
        return hook(module, args, output)

    return module.register_forward_hook(forward_hook)
