"""Errors raised by adapters. ``lifecycle`` turns them into its typed errors, adding the module
name, the state and the call that fixes it (adapters know neither)."""

from __future__ import annotations


class AdapterError(Exception):
    """Base class of adapter errors."""


class BackendUnavailable(AdapterError):
    """The backend's runtime or device is missing; the message says how to get it."""


class UnsupportedForCache(AdapterError):
    """cache-dit cannot wrap this module as it is."""


class InvalidOptions(AdapterError, ValueError):
    """Compile options or a cache config that the adapter refuses before doing any work."""


class TorchInternalsMoved(BackendUnavailable):
    """This torch moved an internal the library relies on (the call slot, dynamo's counters, the
    duck-shape switch); the message names what moved."""
