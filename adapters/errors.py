"""Errors raised by adapters. ``lifecycle`` turns them into its typed errors, adding the module
name, the state and the call that fixes it (adapters know neither)."""

from __future__ import annotations


class AdapterError(Exception):
    """Base class of adapter errors.

    Example::

        try:
            adapter = get_backend("npu")
        except AdapterError as exc:      # BackendUnavailable, InvalidOptions, ...
            print(f"falling back to the CPU: {exc}")
    """


class BackendUnavailable(AdapterError):
    """The backend's runtime or device is missing; the message says how to get it.

    Example::

        try:
            adapter = get_backend("cuda")
        except BackendUnavailable:
            adapter = get_backend("cpu")
    """


class UnsupportedForCache(AdapterError):
    """cache-dit cannot wrap this module as it is.

    Example::

        try:
            CacheDitAdapter().check_supported(module)
        except UnsupportedForCache as exc:   # the message names the way out
            print(exc)
    """


class InvalidOptions(AdapterError, ValueError):
    """Compile options or a cache config that the adapter refuses before doing any work.

    Example::

        try:
            get_backend("cpu").validate_options({"mode": "fastest"})
        except InvalidOptions as exc:    # names the bad value and the accepted ones
            print(exc)
    """


class TorchInternalsMoved(BackendUnavailable):
    """This torch moved an internal the library relies on (the call slot, dynamo's counters, the
    duck-shape switch); the message names what moved."""
