"""``KeyRing``: the keys a broker signs and verifies with, and their lifecycle.

One key is active and signs new leases; every key held verifies. ``rotate``
makes a new signer and, with a grace period, schedules the old one to be
dropped by ``prune``; ``retire`` drops a key at once. Rotation may be two-phase
(``publish_ahead``): the new key is in the JWKS at once but signs only from
its activation time (``signer(now)``), so a verifier that caches the JWKS has
it before the first token it signs. Changes replace the
internal mappings wholesale (copy-on-write), so a verification in another
thread never sees a half-updated ring. A ring can be saved to and loaded from a
key directory (``save_dir``/``from_dir``; ``keydir`` checks that nobody else
could have written it), a file or an environment variable. A ring loaded
with ``from_dir(path, follow=True)`` follows its directory: ``poll()`` (called
by the broker on issue and at every sweep) reloads it when the manifest
changed, at most every ``poll_interval`` seconds; a manifest that cannot be
loaded keeps the ring as it was (logged once per version of the file).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

from . import keydir
from .clock import Duration, seconds
from .errors import InvalidRequest, KeySourceError, MalformedToken
from .jwk import signature_jwks
from .keys import Key, generate_key, key_from_jwk, key_from_pem

__all__ = ["DEFAULT_PUBLISH_AHEAD", "KeyRing"]

log = logging.getLogger("jitbroker")
MANIFEST = "keyring.json"
#: The default ``publish_ahead`` of ``jitbroker keys rotate``: ``JWKSource``'s
#: default ``max_age`` (3600 s), the longest a jitbroker verifier caches a JWKS
#: (the broker's /jwks endpoint says max-age=60, and a verifier refetches at
#: most every min_refresh_interval, 60 s, on an unknown kid). A verifier that
#: fetched the JWKS just before the rotation is due to refetch, without any
#: on-demand fetch, before the new key signs anything.
DEFAULT_PUBLISH_AHEAD = 3600.0
#: How often a following ring looks at its manifest (stat only), by default.
DEFAULT_POLL_INTERVAL = 1.0
# The only names save_dir writes: a kid (a base64url thumbprint) and a suffix.
# Anything else in a manifest (a path, "..") is refused, never opened.
_KEY_FILE = re.compile(r"([A-Za-z0-9_-]{1,128})\.key\.(?:pem|jwk)")


def _key_from_text(data: bytes, password: bytes | str | None, where: str) -> Key:
    """A PEM or JWK key from file or environment contents; errors name ``where``."""
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            return key_from_pem(text, password)
        try:
            jwk = json.loads(text)
        except ValueError as exc:
            raise InvalidRequest("neither a PEM key nor a JSON JWK") from exc
        return key_from_jwk(jwk)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{where}: {exc}") from exc


def _key_file(key: Key, password: bytes | str | None) -> tuple[str, bytes]:
    if key.symmetric:  # no PEM form; the JWK holds the secret in the clear
        return f"{key.kid}.key.jwk", json.dumps(key.to_jwk(private=True)).encode()
    return f"{key.kid}.key.pem", key.to_pem(password if key.private else None)


def _read_manifest(dir_fd: int, folder: Path) -> dict[str, Any]:
    from .tokens import strict_json_object  # here: tokens imports this module

    path = folder / MANIFEST
    data = keydir.read_file(dir_fd, MANIFEST, str(path), kind="manifest", secret=False)
    try:
        return strict_json_object(data, "key ring manifest")
    except MalformedToken as exc:  # duplicates, NaN, not an object, ...
        raise InvalidRequest(f"{path} is not a valid manifest: {exc}") from exc


def _read_key_file(dir_fd: int, folder: Path, name: object, password: bytes | str | None) -> Key:
    """One key file named by the manifest: a bare file name of ours, never a path."""
    match = _KEY_FILE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise InvalidRequest(f"{folder / MANIFEST} names a key file that save_dir never writes")
    path = folder / match[0]
    data = keydir.read_file(dir_fd, match[0], str(path), kind="key file", secret=True)
    key = _key_from_text(data, password, str(path))
    if key.kid != match[1]:
        raise InvalidRequest(f"{path} holds key {key.kid}, not the key it is named for")
    return key


def _drop_times(
    drop_at: Mapping[str, object], ring: KeyRing, what: str = "drop"
) -> dict[str, float]:
    times = {}
    for kid, at in drop_at.items():
        if kid not in ring or isinstance(at, bool) or not isinstance(at, int | float):
            raise InvalidRequest(f"{what} time for {kid[:64]!r} names no key or is not a number")
        if not math.isfinite(at):  # 1e999 parses as inf: a key that never drops
            raise InvalidRequest(f"{what} time for {kid} is not finite")
        times[kid] = float(at)
    return times


def _signature(folder: Path) -> tuple[int, int, int] | None:
    """What tells one manifest from the next: save_dir replaces it by a rename,
    so its inode changes with every save (size and mtime for an edit in place)."""
    try:
        info = os.stat(folder / MANIFEST, follow_symlinks=False)
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


class _Follow:
    """Where a following ring comes from, and what of it was loaded. No thread:
    the ring's ``poll`` looks (a ``stat``) at most every ``interval`` seconds."""

    __slots__ = ("folder", "interval", "loaded", "next_look", "password", "refused")

    def __init__(self, folder: Path, password: bytes | str | None, interval: float) -> None:
        self.folder, self.password, self.interval = folder, password, interval
        self.loaded = _signature(folder)
        self.refused: tuple[int, int, int] | None = None  # the version last logged
        self.next_look = time.monotonic() + interval


class KeyRing:
    """Signing keys by ``kid``: one active key signs, every key held verifies.

    Changes replace the internal mapping wholesale (copy-on-write), so a
    verification running in another thread never sees a half-updated ring.
    """

    __slots__ = (
        "_activate_at",
        "_active",
        "_drop_at",
        "_excluded",
        "_follow",
        "_headers",
        "_keys",
        "_lock",
    )

    def __init__(self, keys: Iterable[Key] = (), *, active: str | None = None) -> None:
        self._lock = threading.RLock()  # serializes writers; readers never lock
        self._keys: dict[str, Key] = {}
        self._headers: dict[str, Key] = {}
        self._active: str | None = None
        self._drop_at: dict[str, float] = {}  # kid -> when a rotated-out key is dropped
        # kid -> when a published key starts signing (two-phase rotation)
        self._activate_at: dict[str, float] = {}
        self._excluded: frozenset[str] = frozenset()  # retired elsewhere: never held again
        self._follow: _Follow | None = None
        for key in keys:
            self.add(key)
        if active is not None:
            self.activate(active)
        elif self._active is None:
            self._active = next((k.kid for k in self._keys.values() if k.private), None)

    # -- construction -----------------------------------------------------
    @classmethod
    def generate(cls, alg: str = "EdDSA") -> KeyRing:
        """A ring holding one fresh key for ``alg`` (EdDSA, ES256, RS256 or HS256)."""
        return cls([generate_key(alg)])

    @classmethod
    def from_pem(cls, pem: bytes | str, password: bytes | str | None = None) -> KeyRing:
        """A ring from one PEM key (a public key gives a verify-only ring)."""
        return cls([key_from_pem(pem, password)])

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> KeyRing:
        """A ring from one JWK (a public JWK gives a verify-only ring)."""
        return cls([key_from_jwk(jwk)])

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any]) -> KeyRing:
        """A verify-only ring from a JWKS document ``{"keys": [...]}``; keys whose
        ``use``/``key_ops`` rule out signatures are skipped (``jwk.signature_jwks``)."""
        keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
        if not isinstance(keys, list):
            raise InvalidRequest('a JWKS must be an object with a "keys" list')
        loaded = [key_from_jwk(k) for k in signature_jwks(keys)]
        if any(k.private for k in loaded):  # HMAC keys are secrets too
            raise InvalidRequest(
                "a JWKS for verification must not contain private keys or HMAC secrets"
            )
        return cls(loaded)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], password: bytes | str | None = None
    ) -> KeyRing:
        """A ring from one key in a file: PEM (optionally encrypted) or a JWK.

        The file (a symbolic link is followed) must be a regular file owned by
        you or root and writable by nobody else, or ``KeySourceError`` says how
        to fix it: whoever can write it can make the broker sign with their key.
        """
        try:
            data = keydir.read_path(path)
        except OSError as exc:
            raise InvalidRequest(f"could not read the key file {path}: {exc.strerror}") from exc
        return cls([_key_from_text(data, password, f"key file {path}")])

    @classmethod
    def from_env(cls, name: str, password: bytes | str | None = None) -> KeyRing:
        """A ring from one key (PEM or JWK) in the environment variable ``name``."""
        value = os.environ.get(name)
        if not value:
            raise InvalidRequest(f"environment variable {name} is not set or empty")
        return cls([_key_from_text(value.encode(), password, f"environment variable {name}")])

    @classmethod
    def from_dir(
        cls,
        path: str | os.PathLike[str],
        password: bytes | str | None = None,
        *,
        follow: bool = False,
        poll_interval: Duration = DEFAULT_POLL_INTERVAL,
    ) -> KeyRing:
        """The ring ``save_dir`` wrote: its keys, its signer, their drop and
        activation times. With ``follow``, the ring keeps following the
        directory: ``poll()`` reloads it once the manifest changed (see the
        module docstring), so a broker signs with the directory's current key.

        Trusted as OpenSSH trusts ``~/.ssh``, or ``KeySourceError`` says how to
        fix it: the directory is not a symbolic link, it and its files are owned
        by you or root and writable by nobody else, and key files are readable
        by nobody else. Files are opened without following symbolic links.
        """
        folder = Path(path)
        interval = seconds(poll_interval, "poll_interval", allow_zero=True)
        follower = _Follow(folder, password, interval) if follow else None
        ring = cls._load_dir(folder, password)
        ring._follow = follower
        return ring

    @classmethod
    def _load_dir(cls, folder: Path, password: bytes | str | None) -> KeyRing:
        dir_fd = keydir.open_dir(folder)
        try:
            manifest = _read_manifest(dir_fd, folder)
            keys = [_read_key_file(dir_fd, folder, name, password) for name in manifest["keys"]]
            ring = cls(keys, active=manifest["active"])
            ring._drop_at = _drop_times(manifest["drop_at"], ring)
            # Absent in manifests written before two-phase rotation.
            ring._activate_at = _drop_times(manifest.get("activate_at", {}), ring, "activation")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            if isinstance(exc, InvalidRequest):
                raise
            raise InvalidRequest(f"{folder} is not a readable jitbroker key directory") from exc
        finally:
            os.close(dir_fd)
        return ring

    def save_dir(self, path: str | os.PathLike[str], password: bytes | str | None = None) -> None:
        """Write every key (PKCS#8 PEM, encrypted with ``password``) into the
        directory ``path`` with mode 0600 (the directory 0700), plus a manifest
        naming the signer and drop times. Files of dropped keys are removed.

        The directory is created, or set to 0700 if it exists; one that is a
        symbolic link or is owned by another user (not root) is refused with
        ``KeySourceError``. Files are written relative to the opened directory
        and never through a symbolic link.

        HMAC keys are written as JWK files, which cannot be encrypted: a
        password for an HMAC ring is refused rather than silently ignored.
        """
        if password is not None and any(k.symmetric for k in self._keys.values()):
            raise InvalidRequest(
                "HMAC keys are saved as plain JWK files and cannot be encrypted; save "
                "without a password and protect the directory (it is made owner-only)"
            )
        try:
            dir_fd = keydir.open_dir(path, create=True)
            try:
                self._save(dir_fd, password)
            finally:
                os.close(dir_fd)
        except OSError as exc:  # no permission, disk full, ...: ours, with the path
            raise KeySourceError(f"could not write the key directory {path}: {exc}") from exc

    def _save(self, dir_fd: int, password: bytes | str | None) -> None:
        with self._lock:
            names = {}
            for key in self._keys.values():
                name, data = _key_file(key, password)
                keydir.write_private(dir_fd, name, data)
                names[key.kid] = name
            manifest = {
                "active": self._active,
                "keys": sorted(names.values()),
                "drop_at": dict(self._drop_at),
                "activate_at": dict(self._activate_at),
            }
        keydir.write_private(dir_fd, MANIFEST, json.dumps(manifest, indent=2).encode())
        keydir.remove_except(dir_fd, ".key.", keep=set(names.values()))

    # -- membership -------------------------------------------------------
    def add(self, key: Key, *, activate: bool = False) -> None:
        """Add a key (verify-only unless ``activate``). Refuses duplicates and mixing HMAC."""
        with self._lock:
            self._add(key, activate)

    def _add(self, key: Key, activate: bool) -> None:
        if key.kid in self._keys:
            raise InvalidRequest(f"key ring already holds a key with kid {key.kid}")
        if self._keys and any(k.symmetric != key.symmetric for k in self._keys.values()):
            raise InvalidRequest("HMAC and asymmetric keys cannot share one key ring")
        self._replace({**self._keys, key.kid: key})
        if activate:
            self.activate(key.kid)

    def activate(self, kid: str) -> None:
        """Make ``kid`` the signing key; it must hold private material."""
        key = self._keys.get(kid)
        if key is None:
            raise InvalidRequest(f"no key with kid {kid} in the ring")
        if not key.private:
            raise InvalidRequest(f"key {kid} is a public key and cannot sign")
        self._active = kid

    def rotate(
        self,
        *,
        grace: Duration | None = None,
        now: float | None = None,
        publish_ahead: Duration = 0,
    ) -> Key:
        """Generate a new key with the active key's algorithm and make it the signer.

        The previous signer stops signing new leases but keeps verifying (and
        re-signing renewals of the leases it signed).

        ``publish_ahead`` (seconds, default 0: at once) makes the rotation
        two-phase: the new key is held and published (``jwks``) from now, but
        signs only from ``now + publish_ahead`` (``signer(now)`` switches), so a
        verifier caching the JWKS for at most that long has the key before any
        token it signs. Until then the previous signer keeps signing.

        ``grace`` (seconds, finite and >= 0) schedules the previous signer to be
        dropped by ``prune`` once that long has passed since it stopped signing
        (``now``, default the system clock, plus ``publish_ahead``). Choose at
        least the issuer's max TTL plus leeway, as ``Broker.rotate_keys`` does,
        so no token outlives its key; ``0`` drops it at the next ``prune``.
        ``grace=None`` (the default) schedules nothing: the previous key keeps
        verifying until ``retire(kid)`` is called. A bad ``grace`` or
        ``publish_ahead`` raises ``InvalidRequest`` and changes nothing.
        """
        # Checked before any change: a refused grace must not leave a rotated ring.
        wait = None if grace is None else seconds(grace, "grace", allow_zero=True)
        ahead = seconds(publish_ahead, "publish_ahead", allow_zero=True)
        with self._lock:
            previous = self.active
            start = (time.time() if now is None else now) + ahead
            key = generate_key(previous.alg)
            self._add(key, activate=not ahead)
            if ahead:
                self._activate_at = {**self._activate_at, key.kid: start}
            if wait is not None:
                self._drop_at[previous.kid] = start + wait
            return key

    def signer(self, now: float) -> Key:
        """The key that signs at ``now``: a published key whose activation time
        has come becomes the active one first (see ``rotate(publish_ahead=)``).
        A following ring also looks at its directory (``poll``)."""
        if self._follow is not None:
            self.poll()
        if self._activate_at:  # a pending two-phase rotation: rare, so a cheap check
            self.promote(now)
        return self.active

    def promote(self, now: float) -> None:
        """Make the newest published key whose activation time has come by
        ``now`` the signer (``signer`` does this on every use)."""
        with self._lock:
            due = {kid: at for kid, at in self._activate_at.items() if at <= now}
            if not due:
                return
            kid = max(due, key=due.__getitem__)  # the newest due key signs
            self._activate_at = {k: v for k, v in self._activate_at.items() if k not in due}
            self.activate(kid)

    def activates_at(self, kid: str) -> float | None:
        """When the published key ``kid`` starts signing, or None (not pending)."""
        return self._activate_at.get(kid)

    # -- following a key directory ------------------------------------------
    @property
    def following(self) -> str | None:
        """The key directory this ring follows (``from_dir(follow=True)``), or None."""
        follow = self._follow
        return None if follow is None else str(follow.folder)

    def poll(self, *, force: bool = False) -> bool:
        """For a following ring: reload the directory if its manifest changed
        since the last load (looked at at most every ``poll_interval`` seconds,
        unless ``force``). True if the ring was reloaded.

        A manifest or key file that cannot be loaded (half-written by a tool
        that does not replace atomically, refused as unsafe, a key file gone
        between the manifest's read and its own) keeps the ring as it was; it is
        logged once per version of the manifest and tried again at every look.
        """
        follow = self._follow
        if follow is None:
            return False
        now = time.monotonic()
        if not force and now < follow.next_look:
            return False
        follow.next_look = now + follow.interval
        seen = _signature(follow.folder)
        if seen is None or seen == follow.loaded:
            return False
        try:
            fresh = KeyRing._load_dir(follow.folder, follow.password)
        except (InvalidRequest, KeySourceError, OSError) as exc:
            if seen != follow.refused:
                follow.refused = seen
                log.warning(
                    "key directory %s not reloaded, keeping its keys: %s", follow.folder, exc
                )
            return False
        self._adopt(fresh)
        follow.loaded = seen
        return True

    def _adopt(self, fresh: KeyRing) -> None:
        """Take ``fresh``'s keys and schedule, less the keys retired elsewhere."""
        with self._lock:
            gone = self._excluded
            self._drop_at = {k: v for k, v in fresh._drop_at.items() if k not in gone}
            self._activate_at = {k: v for k, v in fresh._activate_at.items() if k not in gone}
            self._replace({k: v for k, v in fresh._keys.items() if k not in gone})
            self._active = fresh._active if fresh._active not in gone else None
            if self._active is None and fresh._active is not None:
                log.error("the signing key %s was retired: this ring cannot sign", fresh._active)

    @property
    def excluded(self) -> frozenset[str]:
        """The kids retired elsewhere (``exclude``): never held again."""
        return self._excluded

    def exclude(self, kids: Iterable[str]) -> list[str]:
        """Keys retired by another process (``Broker`` reads them from the store):
        dropped now, and never loaded again by ``poll``. Retiring the active
        key leaves a ring that cannot sign (``active`` raises) until a reload
        or rotation brings another signer. The kids that were held."""
        with self._lock:
            new = set(kids) - self._excluded
            if not new:
                return []
            self._excluded = self._excluded | new
            held = [kid for kid in new if kid in self._keys]
            if self._active in new:
                log.error("the signing key %s was retired: this ring cannot sign", self._active)
                self._active = None
            self._forget(held)
            return held

    def prune(self, now: float) -> list[str]:
        """Drop the rotated-out keys whose grace period ended by ``now``; their kids."""
        with self._lock:
            due = [kid for kid, at in self._drop_at.items() if at <= now]
            if due:
                self._forget(due)
            return due

    def drops_at(self, kid: str) -> float | None:
        """When ``prune`` drops ``kid`` (rotated out with a grace period), or None."""
        return self._drop_at.get(kid)

    def retire(self, kid: str) -> None:
        """Drop ``kid`` at once: tokens it signed stop verifying. Not the active key.

        This ends no lease; ``Broker.retire_key(kid)`` also revokes the leases it signed.
        """
        with self._lock:
            if kid == self._active:
                raise InvalidRequest(f"key {kid} is active; rotate() before retiring it")
            if kid not in self._keys:
                raise InvalidRequest(f"no key with kid {kid} in the ring")
            self._forget([kid])

    def _forget(self, kids: list[str]) -> None:
        for kid in kids:
            self._drop_at.pop(kid, None)
        if any(kid in self._activate_at for kid in kids):
            self._activate_at = {k: v for k, v in self._activate_at.items() if k not in kids}
        self._replace({k: v for k, v in self._keys.items() if k not in kids})

    def _replace(self, keys: dict[str, Key]) -> None:
        # Headers first: a reader that sees the new header map finds its key in
        # either map; both are swapped whole, never mutated in place.
        self._headers = {k.header: k for k in keys.values()}
        self._keys = keys

    @property
    def active(self) -> Key:
        """The key that signs new tokens."""
        if self._active is None:
            raise InvalidRequest("this key ring holds no private key, so it cannot sign")
        return self._keys[self._active]

    def get(self, kid: str) -> Key | None:
        """The key for ``kid``, or None."""
        return self._keys.get(kid)

    def by_header(self, header: str) -> Key | None:
        """The key whose exact encoded JWS header is ``header`` (the verify fast path)."""
        return self._headers.get(header)

    def public(self) -> KeyRing:
        """A verify-only copy of this ring (HMAC keys stay as they are)."""
        return KeyRing([k.public() for k in self._keys.values()])

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public JWKS: asymmetric public keys only, never an HMAC key or private member."""
        keys = [k.public_jwk() for k in self._keys.values()]
        return {"keys": [jwk for jwk in keys if jwk is not None]}

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._keys.values()))

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        keys = ", ".join(f"{k.kid}:{k.alg}" for k in self._keys.values())
        pending = f" pending={sorted(self._activate_at)}" if self._activate_at else ""
        return f"<KeyRing active={self._active!r} keys=[{keys}]{pending}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("jitbroker key rings cannot be pickled")
