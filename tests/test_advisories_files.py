"""Regressions for the local-file findings of security review round 2 (issue 15).

Finding 4: a key directory that other local users can write was trusted, so one
of them could plant a manifest and a key that then signed. Key directories and
files are now trusted only as OpenSSH trusts ``~/.ssh``.

Finding 9: the SQLite lease database and its -wal/-shm files were created
world-readable (0644 under umask 022).

The tests run as root here, so "another user" is uid 65534 (nobody) set with
``os.chown``; root-owned files are trusted, as OpenSSH trusts them.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from jitbroker import Broker, KeyRing
from jitbroker.cli import main
from jitbroker.errors import InvalidRequest, KeySourceError, StoreError
from jitbroker.stores.sqlite import SQLiteStore
from jitbroker.testing import TEST_ISSUER

NOBODY = 65534

pytestmark = pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another uid needs root"
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def keydir(tmp_path: Path) -> tuple[Path, KeyRing]:
    """A key directory as save_dir writes it: 0700, files 0600, one HMAC key."""
    ring = KeyRing.generate("HS256")  # its file holds the secret in the clear
    folder = tmp_path / "keys"
    ring.save_dir(folder)
    return folder, ring


def key_file(folder: Path, ring: KeyRing) -> Path:
    (path,) = folder.glob(f"{ring.active.kid}.key.*")
    return path


def assert_no_key_material(message: str, ring: KeyRing) -> None:
    secret = ring.active.to_jwk(private=True)["k"]
    assert secret not in message
    assert "BEGIN" not in message


# -- finding 4: what from_dir trusts ----------------------------------------------
def test_finding_4_a_planted_key_in_a_world_writable_directory_never_signs(
    tmp_path: Path,
) -> None:
    """The attack itself: the directory is 0777, another user replaces the
    manifest and the key file with their own; loading must refuse, not sign."""
    folder = tmp_path / "keys"
    KeyRing.generate().save_dir(folder)
    folder.chmod(0o777)
    attacker = KeyRing.generate()
    attacker.save_dir(tmp_path / "attacker")
    for path in (tmp_path / "attacker").iterdir():
        target = folder / path.name
        target.write_bytes(path.read_bytes())
        target.chmod(0o600)
    with pytest.raises(KeySourceError, match=f"chmod 700 {folder}"):
        KeyRing.from_dir(folder)


@pytest.mark.parametrize("bits", [0o777, 0o770, 0o730, 0o703, 0o702], ids=oct)
def test_finding_4_from_dir_refuses_a_directory_group_or_others_can_write(
    keydir: tuple[Path, KeyRing], bits: int
) -> None:
    folder, ring = keydir
    folder.chmod(bits)
    with pytest.raises(KeySourceError, match="writable by group or others") as info:
        KeyRing.from_dir(folder)
    assert f"chmod 700 {folder}" in str(info.value)
    assert_no_key_material(str(info.value), ring)


@pytest.mark.parametrize("bits", [0o755, 0o750, 0o711, 0o500], ids=oct)
def test_finding_4_from_dir_accepts_a_directory_only_its_owner_can_write(
    keydir: tuple[Path, KeyRing], bits: int
) -> None:
    folder, ring = keydir
    folder.chmod(bits)
    assert KeyRing.from_dir(folder).active.kid == ring.active.kid


@needs_root
def test_finding_4_from_dir_refuses_a_directory_of_another_user(
    keydir: tuple[Path, KeyRing],
) -> None:
    folder, ring = keydir
    os.chown(folder, NOBODY, -1)
    with pytest.raises(KeySourceError, match=f"owned by uid {NOBODY}") as info:
        KeyRing.from_dir(folder)
    assert f"chown 0 {folder}" in str(info.value)
    assert_no_key_material(str(info.value), ring)


@needs_root
@pytest.mark.parametrize("which", ["manifest", "key"])
def test_finding_4_from_dir_refuses_a_file_of_another_user(
    keydir: tuple[Path, KeyRing], which: str
) -> None:
    folder, ring = keydir
    path = folder / "keyring.json" if which == "manifest" else key_file(folder, ring)
    os.chown(path, NOBODY, -1)
    with pytest.raises(KeySourceError, match=f"owned by uid {NOBODY}") as info:
        KeyRing.from_dir(folder)
    assert str(path) in str(info.value)
    assert_no_key_material(str(info.value), ring)


@pytest.mark.parametrize("bits", [0o620, 0o602, 0o666], ids=oct)
@pytest.mark.parametrize("which", ["manifest", "key"])
def test_finding_4_from_dir_refuses_a_file_group_or_others_can_write(
    keydir: tuple[Path, KeyRing], which: str, bits: int
) -> None:
    folder, ring = keydir
    path = folder / "keyring.json" if which == "manifest" else key_file(folder, ring)
    path.chmod(bits)
    with pytest.raises(KeySourceError, match="writable by group or others") as info:
        KeyRing.from_dir(folder)
    assert f"chmod 600 {path}" in str(info.value)
    assert_no_key_material(str(info.value), ring)


@pytest.mark.parametrize("bits", [0o640, 0o604, 0o644, 0o610], ids=oct)
def test_finding_4_from_dir_refuses_a_key_file_group_or_others_can_read(
    keydir: tuple[Path, KeyRing], bits: int
) -> None:
    folder, ring = keydir
    path = key_file(folder, ring)
    path.chmod(bits)
    with pytest.raises(KeySourceError, match="accessible by group or others") as info:
        KeyRing.from_dir(folder)
    assert f"chmod 600 {path}" in str(info.value)
    assert_no_key_material(str(info.value), ring)


def test_finding_4_a_readable_manifest_is_fine(keydir: tuple[Path, KeyRing]) -> None:
    """The manifest names kids and drop times, no secret: only writing matters."""
    folder, ring = keydir
    (folder / "keyring.json").chmod(0o644)
    assert KeyRing.from_dir(folder).active.kid == ring.active.kid


@pytest.mark.parametrize("which", ["manifest", "key"])
def test_finding_4_from_dir_never_follows_a_symlinked_file(
    keydir: tuple[Path, KeyRing], tmp_path: Path, which: str
) -> None:
    """A link to a perfectly private file elsewhere is still refused: the file
    read is the one in the directory, or nothing."""
    folder, ring = keydir
    path = folder / "keyring.json" if which == "manifest" else key_file(folder, ring)
    elsewhere = tmp_path / "elsewhere"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    with pytest.raises(KeySourceError, match="symbolic link"):
        KeyRing.from_dir(folder)


def test_finding_4_from_dir_refuses_a_symlinked_directory(
    keydir: tuple[Path, KeyRing], tmp_path: Path
) -> None:
    folder, _ = keydir
    link = tmp_path / "link"
    link.symlink_to(folder)
    with pytest.raises(KeySourceError, match=f"symbolic link.*{folder}"):
        KeyRing.from_dir(link)


def test_finding_4_checks_apply_to_the_file_opened_not_the_path(
    keydir: tuple[Path, KeyRing], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race a check-the-path-then-open loader loses: the key file is swapped
    for an open one just before it is opened. The descriptor is what is checked."""
    folder, ring = keydir
    path = key_file(folder, ring)
    real_open = os.open

    def swap_then_open(name: str, flags: int, *args: object, **kwargs: object) -> int:
        if name == path.name:
            (folder / "swap").write_bytes(path.read_bytes())
            (folder / "swap").chmod(0o644)
            (folder / "swap").replace(path)
        return real_open(name, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", swap_then_open)
    with pytest.raises(KeySourceError, match="accessible by group or others"):
        KeyRing.from_dir(folder)


def test_finding_4_a_fifo_under_a_key_name_is_refused_without_hanging(
    keydir: tuple[Path, KeyRing],
) -> None:
    folder, ring = keydir
    path = key_file(folder, ring)
    path.unlink()
    os.mkfifo(path, 0o600)
    errors: list[BaseException] = []

    def load() -> None:
        try:
            KeyRing.from_dir(folder)
        except BaseException as exc:  # handed to the test thread below
            errors.append(exc)

    loader = threading.Thread(target=load, daemon=True)  # a hang must not hang the suite
    loader.start()
    loader.join(timeout=10)
    assert not loader.is_alive(), "from_dir blocked opening a FIFO"
    (error,) = errors
    assert isinstance(error, InvalidRequest)
    assert "not a regular file" in str(error)


# -- finding 4: what save_dir writes into --------------------------------------------
def test_finding_4_save_dir_makes_an_existing_directory_0700(
    tmp_path: Path, umask_022: None
) -> None:
    folder = tmp_path / "keys"
    folder.mkdir()
    folder.chmod(0o777)
    ring = KeyRing.generate()
    ring.save_dir(folder)
    assert mode(folder) == 0o700
    assert KeyRing.from_dir(folder).active.kid == ring.active.kid


def test_finding_4_save_dir_creates_the_directory_0700_whatever_the_umask(
    tmp_path: Path,
) -> None:
    old = os.umask(0)
    try:
        KeyRing.generate().save_dir(tmp_path / "keys")
    finally:
        os.umask(old)
    assert mode(tmp_path / "keys") == 0o700


def test_finding_4_save_dir_refuses_a_symlinked_directory(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    link = tmp_path / "keys"
    link.symlink_to(target)
    with pytest.raises(KeySourceError, match="symbolic link"):
        KeyRing.generate().save_dir(link)
    assert list(target.iterdir()) == []  # nothing was written through the link
    assert mode(target) == 0o755  # nor its mode changed


@needs_root
def test_finding_4_save_dir_refuses_a_directory_of_another_user(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o755)
    os.chown(folder, NOBODY, -1)
    with pytest.raises(KeySourceError, match=f"owned by uid {NOBODY}"):
        KeyRing.generate().save_dir(folder)
    assert list(folder.iterdir()) == []
    assert mode(folder) == 0o755


def test_finding_4_save_dir_write_errors_are_ours(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises((KeySourceError, InvalidRequest)) as info:
        KeyRing.generate().save_dir(tmp_path / "file" / "keys")
    assert not isinstance(info.value, OSError)


# -- finding 4: from_file, one key file named explicitly ------------------------------
def key_pem(tmp_path: Path, bits: int) -> Path:
    path = tmp_path / "k.pem"
    path.write_bytes(KeyRing.generate().active.to_pem())
    path.chmod(bits)
    return path


@pytest.mark.parametrize("bits", [0o620, 0o602, 0o666], ids=oct)
def test_finding_4_from_file_refuses_a_file_group_or_others_can_write(
    tmp_path: Path, bits: int
) -> None:
    path = key_pem(tmp_path, bits)
    with pytest.raises(KeySourceError, match=f"chmod 600 {path}") as info:
        KeyRing.from_file(path)
    assert "BEGIN" not in str(info.value)


@needs_root
def test_finding_4_from_file_refuses_a_file_of_another_user(tmp_path: Path) -> None:
    path = key_pem(tmp_path, 0o600)
    os.chown(path, NOBODY, -1)
    with pytest.raises(KeySourceError, match=f"owned by uid {NOBODY}"):
        KeyRing.from_file(path)


def test_finding_4_from_file_accepts_a_mounted_secret(tmp_path: Path) -> None:
    """Container secrets: a root-owned 0444 or 0644 file behind a symbolic link
    (Kubernetes mounts ``key.pem -> ..data/key.pem``). Nobody else can write it."""
    data = tmp_path / "..data"
    data.mkdir()
    real = key_pem(data, 0o444)
    link = tmp_path / "key.pem"
    link.symlink_to(real)
    assert len(KeyRing.from_file(link)) == 1


# -- finding 4: the command line ------------------------------------------------------
@pytest.mark.parametrize("command", ["rotate", "show-public"])
def test_finding_4_cli_refuses_an_open_directory_in_one_line(
    keydir: tuple[Path, KeyRing], capsys: pytest.CaptureFixture[str], command: str
) -> None:
    folder, ring = keydir
    folder.chmod(0o777)
    assert main(["keys", command, str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"chmod 700 {folder}" in err
    assert "Traceback" not in err
    assert_no_key_material(err, ring)
    folder.chmod(0o700)
    assert len(KeyRing.from_dir(folder)) == 1  # nothing was rotated


def test_finding_4_cli_retire_refuses_a_readable_key_file(
    keydir: tuple[Path, KeyRing], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, ring = keydir
    key_file(folder, ring).chmod(0o644)
    assert main(["keys", "retire", str(folder), "--", ring.active.kid]) == 2
    err = capsys.readouterr().err
    assert "chmod 600" in err
    assert len(err.strip().splitlines()) == 1


def test_finding_4_cli_generate_refuses_a_symlinked_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "keys").symlink_to(target)
    assert main(["keys", "generate", str(tmp_path / "keys")]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert list(target.iterdir()) == []


def test_finding_4_cli_generate_makes_an_existing_directory_0700(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    folder.mkdir()
    folder.chmod(0o777)
    assert main(["keys", "generate", str(folder)]) == 0
    assert mode(folder) == 0o700


# -- finding 9: the SQLite files ---------------------------------------------------
def test_finding_9_sqlite_files_are_created_0600(tmp_path: Path, umask_022: None) -> None:
    """The main file, and the -wal and -shm files SQLite creates next to it."""
    path = tmp_path / "leases.db"
    store = SQLiteStore(path)
    broker = Broker(issuer=TEST_ISSUER, store=store)
    broker.issue("svc:a", "api", ["read"], ttl=60)  # a commit: the WAL exists now
    names = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
    try:
        assert all(name.exists() for name in names)
        assert {name.name: mode(name) for name in names} == {name.name: 0o600 for name in names}
    finally:
        store.close()


def test_finding_9_a_dangling_symlink_gets_a_0600_target(tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "real.db"
    (tmp_path / "leases.db").symlink_to(target)
    SQLiteStore(tmp_path / "leases.db").close()
    assert mode(target) == 0o600


@pytest.mark.parametrize("bits", [0o640, 0o660, 0o400], ids=oct)
def test_finding_9_an_existing_file_keeps_its_mode(tmp_path: Path, bits: int) -> None:
    """Never loosened nor tightened: a group may share the store on purpose."""
    path = tmp_path / "leases.db"
    SQLiteStore(path).close()
    path.chmod(bits)
    if bits & stat.S_IWUSR:
        SQLiteStore(path).close()
    assert mode(path) == bits


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_finding_9_a_file_every_user_can_write_is_refused_untouched(
    tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / "leases.db"
    SQLiteStore(path).close()
    name = Path(f"{path}{suffix}")
    name.touch()
    name.chmod(0o666)
    with pytest.raises(StoreError, match=f"chmod o-rw {name}"):
        SQLiteStore(path)
    assert mode(name) == 0o666


def test_finding_9_a_file_every_user_can_read_opens_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file an older jitbroker created 0644 keeps working, with a warning."""
    path = tmp_path / "leases.db"
    SQLiteStore(path).close()
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="jitbroker"):
        SQLiteStore(path).close()
    assert f"chmod o-r {path}" in caplog.text
    assert mode(path) == 0o644
