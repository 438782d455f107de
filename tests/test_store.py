"""The artifact store on a real local folder and a real S3-compatible server (moto's
ThreadedMotoServer on 127.0.0.1): bad configuration refused at construction, packages published
atomically and fetched once per node, tampered or badly signed packages never handed out, a
read-only store loads without writing, an unreachable store is a result, not a crash."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from store_support import BUCKET, S3Server, start_s3

from adapters.errors import InvalidOptions
from adapters.store import NewPackage, StoreEvent, StoreLocation, obtain, open_store
from adapters.store.cache import default_cache_dir
from adapters.store.lease import ObjectLease
from adapters.store.packages import PackageStore
from lifecycle._errors import InvalidConfigError, translate_adapter_error

KEY_A = b"a" * 32
KEY_B = b"b" * 32


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    yield from start_s3()


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "local":
        return {"artifact_dir": str(tmp_path / "store")}
    server: S3Server = request.getfixturevalue("s3")
    return {"artifact_dir": server.url(), "storage_options": server.options()}


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _blob_path(store: PackageStore, sha: str) -> str:
    return f"{store.location.root}/blobs/{sha}"


def _tamper(store: PackageStore, s3: S3Server | None, sha: str) -> None:
    """Flip one byte of a stored file, in place."""
    if store.location.local:
        path = store.location.path / "blobs" / sha
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        return
    assert s3 is not None
    bucket, _, key = _blob_path(store, sha).partition("/")
    client = s3.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("artifact_dir", "options", "named"), [
    ("", None, "empty"),
    (42, None, "str or PathLike"),
    ("1s3://bucket/prefix", None, "no protocol name"),
    ("s3://bucket/prefix?region=eu", None, "artifact_storage_options"),
    ("s3://AKIA:secret@bucket/prefix", None, "credentials in the URL"),
    ("s3://bucket/../other", None, "'..'"),
    ("s3://B/prefix", None, "bucket name"),
    ("file://relative/path", None, "file:///absolute"),
    ("nosuchproto://bucket/prefix", None, "not an fsspec protocol"),
    ("gs://bucket/prefix", None, "gcsfs"),
    ("/var/cache/dit", {"key": "k", "secret": "s"}, "artifact_storage_options"),
    ("s3://bucket/prefix", {"key": "k"}, "'secret'"),
    ("s3://bucket/prefix", {"key": "k", "secret": "s", "endpoint_url": "localhost:9000"}, "endpoint_url"),
    ("s3://bucket/prefix", ["key", "secret"], "dict of fsspec options"),
])
def test_bad_locations_are_refused_naming_the_option(artifact_dir: Any, options: Any, named: str) -> None:
    with pytest.raises(InvalidOptions, match=named.replace("?", r"\?").replace("(", r"\(")):
        StoreLocation.parse(artifact_dir, options)


def test_s3_without_any_credential_source_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws
    with pytest.raises(InvalidOptions, match=r"no credentials.*'key'.*'secret'"):
        StoreLocation.parse("s3://bucket/prefix")
    # Each credential source the operator may choose is accepted.
    StoreLocation.parse("s3://bucket/prefix", {"anon": True})
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(tmp_path / "token"))
    StoreLocation.parse("s3://bucket/prefix")


def test_a_missing_fsspec_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)  # what Python does when it is not installed
    with pytest.raises(InvalidOptions, match=r"dit-lifecycle\[store\]"):
        StoreLocation.parse("s3://bucket/prefix", {"anon": True})
    StoreLocation.parse("/a/local/folder")  # a local path needs nothing


def test_the_lifecycle_sees_an_invalid_config_error() -> None:
    with pytest.raises(InvalidOptions) as caught:
        StoreLocation.parse("nosuchproto://bucket/x")
    error = translate_adapter_error(caught.value, module="transformer")
    assert isinstance(error, InvalidConfigError) and "transformer: " in str(error)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"signing_key": "a-str-key-of-some-length"}, "bytes, got str"),
    ({"signing_key": b"short"}, "at least 16"),
    ({"cache_dir": ""}, "cache_dir"),
    ({"read_only": "yes"}, "read_only"),
])
def test_bad_store_arguments_are_refused(tmp_path: Path, kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidOptions, match=named):
        open_store(tmp_path, **kwargs)


def test_secrets_stay_out_of_reprs() -> None:
    location = StoreLocation.parse(
        "s3://bucket/prefix", {"key": "AKIAEXAMPLE", "secret": "hunter2", "endpoint_url": "http://h:1"}
    )
    assert "hunter2" not in repr(location) and "AKIAEXAMPLE" not in repr(location)
    assert "http://h:1" in repr(location)


def test_the_callers_options_are_copied_not_kept() -> None:
    options = {"key": "k", "secret": "s"}
    location = StoreLocation.parse("s3://bucket/prefix", options)
    options["secret"] = "changed"
    assert location.storage_options["secret"] == "s"
    with pytest.raises(TypeError):
        location.storage_options["secret"] = "x"  # type: ignore[index]


def test_default_cache_dir_honours_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "dit-lifecycle"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "dit-lifecycle"


# --------------------------------------------------------------------------- publish and fetch
def test_publish_then_fetch_once_per_node(where: dict[str, Any], tmp_path: Path) -> None:
    data = os.urandom(300_000)
    store = open_store(**where, cache_dir=tmp_path / "node-1", signing_key=KEY_A)
    published = store.publish("flux.block-1", {"package": _file(tmp_path, "p.pt2", data)},
                              {"spec": {"dims": [1, 2]}, "torch": "2.13.0"})
    assert published.status == "published", published
    assert store.keys() == ("flux.block-1",)
    assert store.child("aot").publish("in-aot", {"p": _file(tmp_path, "q", b"q")}).status == "published"
    assert store.child("aot").keys() == ("in-aot",) and store.keys() == ("flux.block-1",)

    node = open_store(**where, cache_dir=tmp_path / "node-2", signing_key=KEY_A)
    first = node.fetch("flux.block-1")
    assert first.status == "found", first
    assert first.package is not None and first.package.files["package"].read_bytes() == data
    assert first.package.meta["spec"] == {"dims": [1, 2]}
    # Signed: the bytes checked are the bytes handed out, so even a local folder's go through the cache.
    assert first.fetched_bytes == len(data)
    assert node.child("aot").fetch("flux.block-1").status == "missing"  # another folder of the store
    again = open_store(**where, cache_dir=tmp_path / "node-2", signing_key=KEY_A).fetch("flux.block-1")
    assert again.status == "found" and again.fetched_bytes == 0  # the node fetched it once
    assert node.fetch("no-such-key").status == "missing"
    if store.location.local:  # unsigned, a local folder's verified file is handed out in place
        in_place = open_store(**where, cache_dir=tmp_path / "node-3").fetch("flux.block-1")
        assert in_place.package is not None and in_place.fetched_bytes == 0
        assert in_place.package.files["package"].is_relative_to(store.location.path)


def test_a_failed_publish_leaves_nothing_visible(where: dict[str, Any], tmp_path: Path) -> None:
    store = open_store(**where, cache_dir=tmp_path / "cache")
    files = {"a": _file(tmp_path, "a", b"first"), "b": tmp_path / "not-there"}
    result = store.publish("half", files)
    assert result.status == "failed" and "not-there" in result.detail
    assert store.fetch("half").status == "missing"
    if store.location.local:  # no temporary file left behind either
        leftovers = [p for p in store.location.path.rglob("*") if p.name.startswith(".")]
        assert leftovers == []


# ------------------------------------------------------------------------------------ tampering
def test_a_flipped_byte_is_never_handed_out(where: dict[str, Any], s3: S3Server, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    store = open_store(**where, cache_dir=tmp_path / "builder")
    store.publish("k", {"package": _file(tmp_path, "p", data)})
    _tamper(store, s3, hashlib.sha256(data).hexdigest())
    node = open_store(**where, cache_dir=tmp_path / "node")
    fetched = node.fetch("k")
    assert fetched.status == "untrusted" and fetched.package is None
    assert "SHA-256" in fetched.detail
    assert not any((tmp_path / "node" / "blobs").glob("*"))  # nothing kept in the cache either


def test_a_manifest_signed_with_another_key_or_unsigned_is_refused(
    where: dict[str, Any], tmp_path: Path
) -> None:
    package = _file(tmp_path, "p", b"native code")
    open_store(**where, cache_dir=tmp_path / "c1", signing_key=KEY_B).publish("k", {"package": package})
    trusting_a = open_store(**where, cache_dir=tmp_path / "c2", signing_key=KEY_A)
    refused = trusting_a.fetch("k")
    assert refused.status == "untrusted" and "signature does not verify" in refused.detail
    open_store(**where, cache_dir=tmp_path / "c1").publish("k", {"package": package})  # unsigned
    assert "not signed" in trusting_a.fetch("k").detail
    open_store(**where, cache_dir=tmp_path / "c1", signing_key=KEY_A).publish("k", {"package": package})
    assert trusting_a.fetch("k").status == "found"


def test_an_untrusted_package_is_rebuilt_or_refused_by_choice(where: dict[str, Any], tmp_path: Path) -> None:
    open_store(**where, cache_dir=tmp_path / "c", signing_key=KEY_B).publish(
        "k", {"package": _file(tmp_path, "evil", b"someone else's code")})
    store = open_store(**where, cache_dir=tmp_path / "c", signing_key=KEY_A)
    events: list[StoreEvent] = []

    def build() -> list[NewPackage]:
        return [NewPackage("k", {"package": _file(tmp_path, "good", b"our code")}, {})]

    refused = obtain(store, ["k"], build, lease_key="k", rebuild_untrusted=False, on_event=events.append)
    assert refused.status == "untrusted" and not refused.packages
    rebuilt = obtain(store, ["k"], build, lease_key="k")
    assert rebuilt.status == "built" and [e.status for e in rebuilt.events] == ["untrusted"]
    assert [e.status for e in events] == ["untrusted"]
    loaded = obtain(store, ["k"], build, lease_key="k")
    assert loaded.status == "loaded" and loaded.packages["k"].files["package"].read_bytes() == b"our code"


def test_a_changed_cache_file_is_fetched_again(s3: S3Server, tmp_path: Path) -> None:
    url = s3.url()
    data = os.urandom(10_000)
    open_store(url, storage_options=s3.options(), cache_dir=tmp_path / "c").publish(
        "k", {"package": _file(tmp_path, "p", data)})
    node = open_store(url, storage_options=s3.options(), cache_dir=tmp_path / "node")
    path = node.fetch("k").package.files["package"]  # type: ignore[union-attr]
    path.write_bytes(b"x" + data[1:])
    again = node.fetch("k")
    assert again.status == "found" and again.fetched_bytes == len(data)
    assert again.package is not None and again.package.files["package"].read_bytes() == data


# ------------------------------------------------------------------------------------ read-only
def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def test_a_read_only_folder_loads_without_writing(tmp_path: Path) -> None:
    root = tmp_path / "image-layer"
    builder = open_store(root, cache_dir=tmp_path / "ci", signing_key=KEY_A)
    builder.publish("k", {"package": _file(tmp_path, "p", b"prebuilt by CI")})
    for path in [root, *root.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = _snapshot(root)
    try:
        for read_only in (True, False):
            store = open_store(root, cache_dir=tmp_path / "node", signing_key=KEY_A, read_only=read_only)
            loaded = obtain(store, ["k"], lambda: pytest.fail("nothing may be built"), lease_key="k")
            assert loaded.status == "loaded"
        read_only_store = open_store(root, cache_dir=tmp_path / "node", read_only=True)
        missing = obtain(read_only_store, ["other"], lambda: pytest.fail("no build"), lease_key="other")
        assert missing.status == "missing"
        assert read_only_store.publish("x", {}).status == "read_only"
        assert _snapshot(root) == before
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_a_bucket_opened_read_only_loads_without_writing(s3: S3Server, tmp_path: Path) -> None:
    url = s3.url()
    open_store(url, storage_options=s3.options(), cache_dir=tmp_path / "ci").publish(
        "k", {"package": _file(tmp_path, "p", b"prebuilt")})
    prefix = url.removeprefix(f"s3://{BUCKET}/")

    def objects() -> dict[str, str]:
        listing = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return {o["Key"]: o["ETag"] for o in listing.get("Contents", [])}

    before = objects()
    store = open_store(url, storage_options=s3.options(), cache_dir=tmp_path / "node", read_only=True)
    assert obtain(store, ["k"], lambda: pytest.fail("no build"), lease_key="k").status == "loaded"
    assert obtain(store, ["k2"], lambda: pytest.fail("no build"), lease_key="k2").status == "missing"
    assert objects() == before


# --------------------------------------------------------------------------- waiting, unreachable
def test_a_held_lease_makes_others_wait_then_time_out(where: dict[str, Any], tmp_path: Path) -> None:
    store = open_store(**where, cache_dir=tmp_path / "c")
    lease = store.lease("k", ttl_s=30)
    assert lease.try_acquire()
    try:
        assert not store.lease("k", ttl_s=30).try_acquire()  # exactly one holder
        events: list[StoreEvent] = []
        started = time.monotonic()
        result = obtain(open_store(**where, cache_dir=tmp_path / "c"), ["k"],
                        lambda: pytest.fail("the lease is held"), lease_key="k", wait_s=0.6,
                        poll_s=0.1, on_event=events.append)
        assert result.status == "timeout" and 0.5 <= time.monotonic() - started < 5
        assert [e.status for e in events] == ["waiting"] and result.waited_s > 0
    finally:
        lease.release()
    taken = store.lease("k", ttl_s=30)
    assert taken.try_acquire()  # free again once released
    taken.release()


def test_an_unreachable_store_is_a_result_the_caller_falls_back_on(tmp_path: Path) -> None:
    server = start_s3()
    s3 = next(server)
    url = s3.url()
    open_store(url, storage_options=s3.options(), cache_dir=tmp_path / "ci").publish(
        "k", {"package": _file(tmp_path, "p", b"x" * 1000)})
    store = open_store(url, storage_options=s3.options(), cache_dir=tmp_path / "node")
    builds: list[str] = []

    def build() -> list[NewPackage]:
        builds.append("k2")
        server.close()  # the server goes away while this replica builds
        return [NewPackage("k2", {"package": _file(tmp_path, "p2", b"local")}, {})]

    built = obtain(store, ["k2"], build, lease_key="k2")
    assert built.status == "built" and not built.published  # usable here, audited as unpublished
    assert built.publishes["k2"].status == "unreachable"
    assert built.packages["k2"].files["package"].read_bytes() == b"local"
    started = time.monotonic()
    fresh = open_store(url, storage_options=s3.options(), cache_dir=tmp_path / "other-node")
    result = obtain(fresh, ["k"], lambda: pytest.fail("no build while unreachable"), lease_key="k")
    assert result.status == "unreachable" and "EndpointConnectionError" in result.detail
    assert time.monotonic() - started < 10


# ------------------------------------------------------------------------------ lease objects
def test_of_racing_replicas_exactly_one_takes_the_lease_object(s3: S3Server, tmp_path: Path) -> None:
    store = open_store(s3.url(), storage_options=s3.options(), cache_dir=tmp_path / "c")
    leases = [store.lease("k", ttl_s=30) for _ in range(6)]
    barrier = threading.Barrier(len(leases))
    taken: list[bool] = [False] * len(leases)

    def race(index: int) -> None:
        barrier.wait()
        taken[index] = leases[index].try_acquire()

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(leases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert taken.count(True) == 1
    finally:
        for lease, held in zip(leases, taken, strict=True):
            if held:
                lease.release()
    again = store.lease("k", ttl_s=30)
    assert again.try_acquire()  # a released lease is free at once
    again.release()


def test_a_lease_renewed_while_others_read_it_reads_as_held(s3: S3Server, tmp_path: Path) -> None:
    # The holder replaces its lease object every 0.1 s; a reader's HEAD and GET may straddle it.
    store = open_store(s3.url(), storage_options=s3.options(), cache_dir=tmp_path / "c")
    holder = store.lease("renewed", ttl_s=0.3, clock_skew_s=5.0)
    assert holder.try_acquire()
    try:
        others = [store.lease("renewed", ttl_s=0.3, clock_skew_s=5.0) for _ in range(60)]
        assert not any(other.try_acquire() for other in others)
        assert holder.renew_errors == 0 and not holder.lost
    finally:
        holder.release()


def test_a_dead_holder_with_a_skewed_clock_is_taken_over_by_observation(
    s3: S3Server, tmp_path: Path
) -> None:
    """A node whose clock ran an hour ahead took the lease and died: its expiry says an hour, but
    a waiter that sees the object unchanged for ``ttl_s`` by its own clock takes it over."""
    store = open_store(s3.url(), storage_options=s3.options(), cache_dir=tmp_path / "c")
    dead = ObjectLease(store.objects, "k", ttl_s=0.5, clock_skew_s=0.0,
                       clock=lambda: time.time() + 3600)
    dead.generation = 0
    assert store.objects.create(dead._name(0), dead._document())  # written as the dead node did
    waiter = store.lease("k", ttl_s=0.5, clock_skew_s=0.0)
    started = time.monotonic()
    assert not waiter.try_acquire()
    while not waiter.try_acquire():
        assert time.monotonic() - started < 5
        time.sleep(0.1)
    assert time.monotonic() - started >= 0.5
    waiter.release()


def test_a_holder_learns_it_lost_the_lease(s3: S3Server, tmp_path: Path) -> None:
    store = open_store(s3.url(), storage_options=s3.options(), cache_dir=tmp_path / "c")
    slow = store.lease("k", ttl_s=0.3, clock_skew_s=0.0)
    assert slow.try_acquire()
    # Another replica takes generation 1 over it (as after an expiry this holder missed).
    other = ObjectLease(store.objects, "k", ttl_s=30)
    other.generation = 1
    assert store.objects.create(other._name(1), other._document())
    deadline = time.monotonic() + 5
    while not slow.lost:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    slow.release()  # does not mark the newer holder's lease released
    assert not store.lease("k", ttl_s=30).try_acquire()
