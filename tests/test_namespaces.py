"""An s3cachefs mount on the host reaches a process in another mount namespace through a bind mount
of its parent directory with slave propagation: what matrix-docker-ansible-deploy relies on (see
docs/matrix-docker-ansible-deploy.md).

MDAD starts Synapse with `--mount type=bind,src=/matrix/synapse/storage,dst=/matrix-media-store-parent,
bind-propagation=slave` and s3cachefs mounts /matrix/synapse/storage/media-store on the host. For
such a bind, Docker (moby daemon/oci_linux.go, WithMounts) requires the source to sit on a shared or
slave mount (systemd makes / shared at boot), makes the container's root `rslave` and bind-mounts
the source recursively (`rbind`) with `slave` propagation. Here, with no Docker:

    host                      P is bound on itself and made shared (its own peer group), like the
                              shared / of a systemd host; s3cachefs is mounted at P/media-store
    other mount namespace     `unshare --mount --propagation slave` (the rslave root), then
                              `mount --rbind P Q` and `mount --make-rslave Q` (the container's bind)

and the process in the other namespace reads, at Q/media-store, a file written through the host's
mount. The control with `--make-rprivate Q` in place of rslave shows that a mount made after the
namespace does not reach a private bind: the test can fail.

Mount propagation happens inside mount(2) and umount(2): when the host's mount is up, every slave
copy is too. So the other process needs no polling for the file, only a bounded wait for its turn.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import MakeMount, Mount, fusermount_unmount, wait_until

pytestmark = pytest.mark.mount

# Runs in the other mount namespace. $1 = P (the host's shared parent), $2 = Q (where this
# "container" sees it), $3 = rslave or rprivate, $4 = a directory for the hand-shake and results,
# $5 = "hold" to keep Q/media-store/hello.txt open from then on (as Synapse does while it sends a
# file). It binds P at Q, says it is ready, waits (bounded) for the go file, then reports what it
# sees at Q/media-store: its line in this namespace's mount table and the content of hello.txt.
_CONTAINER_SCRIPT = r"""
set -u
parent=$1 view=$2 propagation=$3 io=$4 hold=$5
mount --rbind "$parent" "$view" || exit 10
mount --make-"$propagation" "$view" || exit 11
if [ "$hold" = hold ]; then
    exec 3< "$view/media-store/hello.txt" || exit 13
fi
: > "$io/ready"
i=0
while [ ! -e "$io/go" ]; do
    i=$((i + 1))
    [ "$i" -le 600 ] || exit 12
    sleep 0.1
done
# Field 5 of /proc/self/mountinfo is the mount point.
awk -v p="$view/media-store" '$5 == p' /proc/self/mountinfo > "$io/mountinfo"
cat "$view/media-store/hello.txt" > "$io/read" 2> "$io/read.err"
echo $? > "$io/read.rc"
"""

READY_TIMEOUT = 30.0
EXIT_TIMEOUT = 30.0


def _run(*args: str) -> None:
    r = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}"


def _require_namespaces() -> None:
    """Fail loudly (never skip), as the harness does for FUSE: a skipped test proves nothing."""
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root (mount --bind, mount --make-shared, unshare --mount)")
    for tool in ("unshare", "mount", "umount", "awk"):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` not found (util-linux / awk)")
    if problems:
        pytest.fail("mount namespace test cannot run: " + "; ".join(problems), pytrace=False)


@contextlib.contextmanager
def shared_parent(path: Path) -> Iterator[Path]:
    """`path` bound on itself as a shared mount in a peer group of its own (private first, so that
    nothing mounted under it leaks into the host's peer groups), unmounted at the end."""
    path.mkdir(parents=True, exist_ok=True)
    _run("mount", "--bind", str(path), str(path))
    try:
        _run("mount", "--make-private", str(path))
        _run("mount", "--make-shared", str(path))
        yield path
    finally:
        r = subprocess.run(["umount", str(path)], capture_output=True, text=True, timeout=30, check=False)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)
            raise AssertionError(
                f"umount {path} failed ({r.returncode}): {r.stderr.strip()}; lazily detached"
            )


@dataclass
class Seen:
    """What the process in the other namespace saw at Q/media-store."""

    mountinfo: str  # its line in that namespace's mount table ("" when nothing is mounted there)
    read_rc: int
    content: bytes
    error: str

    @property
    def fstype(self) -> str:
        fields = self.mountinfo.split()
        return fields[fields.index("-") + 1] if "-" in fields else ""


class OtherNamespace:
    """A process in a mount namespace of its own that sees the host's P at Q, as a container does."""

    def __init__(self, parent: Path, view: Path, io: Path, propagation: str, hold: bool) -> None:
        self.io = io
        io.mkdir()
        view.mkdir()
        self.log = open(io / "log", "wb")  # noqa: SIM115 - the child's stdout/stderr, closed in stop()
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "sh", "-c", _CONTAINER_SCRIPT,
             "sh", str(parent), str(view), propagation, str(io), "hold" if hold else "-"],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def _describe(self) -> str:
        return f"exit code {self.proc.poll()}, output: {(self.io / 'log').read_text(errors='replace')!r}"

    def wait_ready(self) -> None:
        """Until its bind of P at Q is in place."""
        ready = wait_until(
            lambda: (self.io / "ready").exists() or self.proc.poll() is not None, READY_TIMEOUT
        )
        assert ready and (self.io / "ready").exists(), f"namespaced process not ready: {self._describe()}"

    def look(self) -> Seen:
        """Let it look at Q/media-store now; wait for it to finish and return what it saw."""
        (self.io / "go").touch()
        try:
            code = self.proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"namespaced process still running after {EXIT_TIMEOUT:.0f}s") from None
        assert code == 0, f"namespaced process failed: {self._describe()}"
        return Seen(
            mountinfo=(self.io / "mountinfo").read_text().strip(),
            read_rc=int((self.io / "read.rc").read_text()),
            content=(self.io / "read").read_bytes(),
            error=(self.io / "read.err").read_text().strip(),
        )

    def stop(self) -> None:
        """End it (and with it its namespace and every mount in it)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()


@contextlib.contextmanager
def other_namespace(
    tmp_path: Path, parent: Path, propagation: str = "rslave", hold: bool = False
) -> Iterator[OtherNamespace]:
    ns = OtherNamespace(parent, tmp_path / "container-view", tmp_path / "container-io", propagation, hold)
    try:
        ns.wait_ready()
        yield ns
    finally:
        ns.stop()


def media_store_mount(make_mount: MakeMount, parent: Path) -> Mount:
    """An s3cachefs Mount (registered with make_mount for logs and teardown) at parent/media-store,
    not started."""
    m = make_mount(start=False)
    m.path = (parent / "media-store").resolve()
    m.path.mkdir()
    return m


def write_hello(m: Mount, text: bytes) -> None:
    with open(m.path / "hello.txt", "wb") as f:
        f.write(text)


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    _require_namespaces()
    return tmp_path / "storage"


def test_a_mount_made_before_the_container_is_seen_through_its_slave_bind(
    make_mount: MakeMount, tmp_path: Path, parent: Path
) -> None:
    with shared_parent(parent):
        m = media_store_mount(make_mount, parent)
        try:
            m.start()
            write_hello(m, b"mounted before the namespace\n")
            with other_namespace(tmp_path, parent) as ns:
                seen = ns.look()
            assert seen.fstype.startswith("fuse"), seen
            assert (seen.read_rc, seen.content) == (0, b"mounted before the namespace\n"), seen
        finally:
            m.cleanup()


def test_a_mount_made_after_the_container_started_reaches_it_through_its_slave_bind(
    make_mount: MakeMount, tmp_path: Path, parent: Path
) -> None:
    with shared_parent(parent):
        m = media_store_mount(make_mount, parent)
        try:
            with other_namespace(tmp_path, parent) as ns:
                m.start()
                write_hello(m, b"mounted after the namespace\n")
                seen = ns.look()
            assert seen.fstype.startswith("fuse"), seen
            assert (seen.read_rc, seen.content) == (0, b"mounted after the namespace\n"), seen
        finally:
            m.cleanup()


def stop_like_systemd(m: Mount) -> None:
    """`systemctl stop` (KillMode=mixed): SIGTERM to the daemon, which unmounts and exits 0."""
    assert m.proc is not None
    m.proc.send_signal(signal.SIGTERM)
    assert m.wait() == 0, m.log_tail()


def crash_and_start_again(m: Mount, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash (the watchdog's SIGABRT, an OOM kill), then Restart=on-failure: the new daemon
    finds the dead mount ("Transport endpoint is not connected") and clears it itself."""
    assert m.proc is not None
    os.killpg(m.proc.pid, signal.SIGKILL)
    m.proc.wait(10)
    assert m.is_mounted(), "the dead mount stays in the mount table until someone clears it"
    # The harness refuses to start over a mount, and may take the dead one (whose root attributes
    # the kernel still caches) for the new one: wait for the new daemon's own word instead.
    monkeypatch.setattr(m, "is_mounted", lambda: False)
    m.start()
    monkeypatch.undo()
    mounted = "INFO s3cachefs.mount: mounted s3://"
    settled = wait_until(lambda: m.log_text().count(mounted) == 2 or not m.running, 30)
    assert settled and m.running, (
        f"the restarted daemon did not mount (exit code {m.returncode}):\n{m.log_tail()}"
    )
    assert "clearing a dead mount" in m.log_text()


@pytest.mark.parametrize(
    "how",
    [
        "fusermount-u",
        "sigterm-with-a-file-open-in-the-container",
        "sigkill-with-a-file-open-in-the-container",
    ],
)
def test_a_restarted_mount_reaches_a_running_container_through_its_slave_bind(
    make_mount: MakeMount, tmp_path: Path, parent: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`systemctl restart s3cachefs@…`, or a crash and Restart=on-failure, while Synapse's
    container runs: the unmount (the daemon's own on SIGTERM, or the next daemon's of the dead
    mount, both lazy) takes the container's copy away too, even with a file of the old mount open
    in the container, and the new mount reaches it, with no restart of the container."""
    hold = how != "fusermount-u"
    with shared_parent(parent):
        m = media_store_mount(make_mount, parent)
        try:
            m.start()
            write_hello(m, b"first daemon\n")
            with other_namespace(tmp_path, parent, hold=hold) as ns:
                if how == "fusermount-u":
                    # Mount.unmount waits for the daemon to exit: it would not, were the
                    # container's copy of the mount kept (the last test shows it).
                    m.unmount()
                    m.start()
                elif how.startswith("sigterm"):
                    stop_like_systemd(m)
                    m.start()
                else:
                    crash_and_start_again(m, monkeypatch)
                write_hello(m, b"second daemon\n")
                seen = ns.look()
            assert seen.fstype.startswith("fuse"), seen
            assert (seen.read_rc, seen.content) == (0, b"second daemon\n"), seen
        finally:
            m.cleanup()


def test_a_mount_made_after_the_container_started_does_not_reach_a_private_bind(
    make_mount: MakeMount, tmp_path: Path, parent: Path
) -> None:
    """The control: the same steps as above with `--make-rprivate` in place of rslave. The
    container sees the empty directory under the mount point, so the tests above can fail."""
    with shared_parent(parent):
        m = media_store_mount(make_mount, parent)
        try:
            with other_namespace(tmp_path, parent, propagation="rprivate") as ns:
                m.start()
                write_hello(m, b"mounted after the namespace\n")
                assert (m.path / "hello.txt").read_bytes() == b"mounted after the namespace\n"
                seen = ns.look()
            assert seen.mountinfo == "", seen
            assert seen.read_rc != 0 and seen.content == b"", seen
            assert "No such file" in seen.error, seen
        finally:
            m.cleanup()


def test_an_unmount_does_not_reach_a_private_bind_which_keeps_the_old_daemon_serving_it(
    make_mount: MakeMount, tmp_path: Path, parent: Path
) -> None:
    """The control for the restart: with `--make-rprivate`, the host's unmount leaves the
    container's copy in place, and the old daemon keeps serving it until the container ends. A
    restarted s3cachefs would then never reach that container."""
    with shared_parent(parent):
        m = media_store_mount(make_mount, parent)
        try:
            m.start()
            write_hello(m, b"first daemon\n")
            with other_namespace(tmp_path, parent, propagation="rprivate") as ns:
                r = fusermount_unmount(m.path)
                assert r.returncode == 0, r.stderr
                assert not m.is_mounted()
                seen = ns.look()
            assert seen.fstype.startswith("fuse"), seen
            assert (seen.read_rc, seen.content) == (0, b"first daemon\n"), seen
            # The container (and its namespace) is gone: the last copy went with it.
            assert m.wait() == 0, m.log_tail()
        finally:
            m.cleanup()
