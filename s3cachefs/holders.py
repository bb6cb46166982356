"""Whether a file of the mount is still open for writing through a descriptor FUSE cannot tell apart.

FUSE sends FLUSH at every close(), carrying only the file handle, and every dup() of a descriptor and
every fork()ed copy of it share one handle. So the close of one of several descriptors of one open
looks like the last close: a shell's `cmd > file` opens the file, dup2()s it onto stdout and closes the
first descriptor before `cmd` has written anything. The kernel's own tables tell them apart: close()
takes the descriptor out of the process's table before it sends FLUSH (close_fd: pick_file, then
filp_close), and process exit does the same for each descriptor. So if /proc still shows a descriptor
of this file open for writing, in any process, the close was not the last one.

Used only for a file that is empty at close (whether a 0-byte object is put now or by a later close);
a file with data is uploaded at every close anyway. Best effort: a daemon not running as root sees only
its own user's processes, and /proc mounted with hidepid hides the others; then an empty object is put
at that close and replaced by the last one, as before. The scan is bounded in time (SCAN_SECONDS): past
it the answer is "no", i.e. the close puts the empty object.
"""

from __future__ import annotations

import os
import time

SCAN_SECONDS = 1.0
_WRITE_MODES = (os.O_WRONLY, os.O_RDWR)


def open_for_writing_elsewhere(name: str, ino: int, proc: str = "/proc") -> bool:
    """True if a process other than this one has a descriptor open for writing on the file whose
    last path component is `name` and inode number `ino` (the number the mount gives the kernel)."""
    deadline = time.monotonic() + SCAN_SECONDS
    me = os.getpid()
    suffix = "/" + name
    try:
        pids = os.listdir(proc)
    except OSError:
        return False
    for pid in pids:
        if not pid.isdigit() or int(pid) == me:
            continue
        if time.monotonic() > deadline:
            return False
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            # readlink is cheap and does not reach any filesystem; fdinfo is read only for a name match.
            if target.endswith(suffix) and _writes_ino(f"{proc}/{pid}/fdinfo/{fd}", ino):
                return True
    return False


def _writes_ino(fdinfo: str, ino: int) -> bool:
    """fdinfo (Linux >= 5.14 has ino:) says the descriptor is open for writing on inode `ino`."""
    fields: dict[str, str] = {}
    try:
        with open(fdinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    except OSError:
        return False
    try:
        return int(fields["ino"]) == ino and int(fields["flags"], 8) & os.O_ACCMODE in _WRITE_MODES
    except (KeyError, ValueError):
        return False
