"""Model-based random testing, the long run (issue 6): at least 100,000 operations, zero mismatches.

Runs tests/model.py's state machine (the one tests/test_model.py runs for two minutes in CI) on its
own SeaweedFS and mount, batch after batch of Hypothesis examples, until --operations operations have
been executed or --max-minutes have passed. An operation is one step of the machine: one create,
write, append, overwrite, truncate, read, stat, listdir, unlink, mkdir, rmdir, rename, remount (with
its full check), full check, or one run of several descriptors on one file (interleaved writes
through 2-3 descriptors, 2-4 threads or processes writing at once, a rename while open for
writing), every outcome compared with the in-memory model.

Batches alternate between the one-mount machine and the two-mount one (tests/model.py "Two mounts":
a second mount of the bucket, both with --metadata-ttl 0, writes, overwrites, unlinks, reads and stats
through either), so that about --two-mount-share of the batches run two mounts; each mode has its own
SeaweedFS bucket(s) and mounts. The summary gives each mode's numbers and the operations that went
through the second mount.

Prints progress after every batch, then the operations executed, examples, mismatches, ops/s and the
breakdown per operation. On a mismatch, Hypothesis shrinks it and the minimal failing sequence is
printed (with the calls as the mount saw them and the mount's log).

    python -m bench.model_long [--operations 100000] [--max-minutes 60] [--steps 200]
                               [--two-mount-share 0.5] [--avoid rename-empty-file,...]
                               [--workdir DIR] [--keep]

Exit codes: 0 the target was reached with no mismatch; 1 a mismatch (a bug, or a model error);
2 the harness itself broke (no server, no FUSE); 3 --max-minutes ran out first (no mismatch so far).
--avoid skips the calls that trigger known, still open s3cachefs bugs (tests/model.py KNOWN_BUGS),
so that a long run can look for the next one; the count of skipped calls is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.harness import HarnessError, S3Server, check_fuse_available
from tests.model import KNOWN_BUGS, Env, Tuning, machine_for


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--operations", type=int, default=100_000, help="stop once this many have run")
    ap.add_argument("--max-minutes", type=float, default=60.0, help="stop after this long in any case")
    ap.add_argument("--steps", type=int, default=200, help="steps per example (stateful_step_count)")
    ap.add_argument("--batch", type=int, default=20, help="examples per Hypothesis run")
    ap.add_argument(
        "--two-mount-share",
        type=float,
        default=0.5,
        help="share of the batches run with two mounts (0: one mount only, 1: two mounts only)",
    )
    ap.add_argument(
        "--avoid",
        default=os.environ.get("S3CACHEFS_MODEL_AVOID", ""),
        help=f"comma-separated known bugs to steer around: {', '.join(sorted(KNOWN_BUGS))}",
    )
    ap.add_argument(
        "--read-part-size",
        default="64K",
        help="the mount's --read-part-size (default 64K: parts of big files)",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new temporary directory")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, caches)")
    args = ap.parse_args()
    avoid = frozenset(n.strip() for n in args.avoid.split(",") if n.strip())
    if avoid - set(KNOWN_BUGS):
        ap.error(f"--avoid: unknown names {sorted(avoid - set(KNOWN_BUGS))}; known: {sorted(KNOWN_BUGS)}")

    try:
        check_fuse_available()
    except HarnessError as e:
        print(f"model_long: {e}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="s3cfs-model-", dir=args.workdir))
    print(f"work directory {workdir}; avoiding known bugs: {', '.join(sorted(avoid)) or 'none'}", flush=True)
    server = S3Server(workdir / "s3")
    try:
        server.start()
    except HarnessError as e:
        print(f"model_long: {e}", file=sys.stderr)
        return 2
    envs = {
        two: Env(
            server,
            workdir / ("two" if two else "one"),
            Tuning(avoid=avoid, read_part_size=args.read_part_size, two_mounts=two),
        )
        for two in (False, True)
    }
    for each in envs.values():
        each.workdir.mkdir()
    machines = {two: machine_for(v) for two, v in envs.items()}
    started = time.monotonic()
    batches = {False: 0, True: 0}
    spent = {False: 0.0, True: 0.0}  # seconds in each mode's batches (each Stats counts from the start)

    def total_ops() -> int:
        return sum(v.stats.ops for v in envs.values())

    def two_next() -> bool:
        """The mode whose share of the batches so far is below its target."""
        done = batches[False] + batches[True]
        return bool(batches[True] < float(args.two_mount_share) * (done + 1))

    batch = settings(
        max_examples=args.batch,
        stateful_step_count=args.steps,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )
    deadline = time.monotonic() + args.max_minutes * 60
    code = 3
    mismatch: BaseException | None = None
    try:
        while True:
            if total_ops() >= args.operations:
                code = 0
                break
            if time.monotonic() >= deadline:
                break
            two = args.two_mount_share >= 1 or two_next()
            batches[two] += 1
            batch_started = time.monotonic()
            try:
                run_state_machine_as_test(machines[two], settings=batch)
            except HarnessError:
                raise
            except Exception as e:  # Hypothesis re-raises the shrunk failure (Mismatch, or a crash)
                mismatch = e
                code = 1
                break
            finally:
                spent[two] += time.monotonic() - batch_started
            took = time.monotonic() - started
            print(
                f"[{took / 60:5.1f} min] {total_ops()} operations ({envs[True].stats.ops} with two mounts, "
                f"{envs[True].stats.second_ops} through the second), "
                f"{sum(v.stats.examples for v in envs.values())} examples, {total_ops() / took:.1f} ops/s",
                flush=True,
            )
    except HarnessError as e:
        print(f"model_long: the harness broke: {e}", file=sys.stderr)
        code = 2
    finally:
        for each in envs.values():
            each.close()
        server.stop()
    if mismatch is not None:
        print("\n==== MISMATCH (shrunk by Hypothesis) ====")
        print("".join(traceback.format_exception(mismatch)))
    print("\n==== summary ====")
    for two, each in envs.items():
        rate = each.stats.ops / max(spent[two], 1e-9)
        print(
            f"-- {'two mounts' if two else 'one mount'}: {batches[two]} batches, {spent[two]:.0f} s, "
            f"{rate:.1f} ops/s in them (the rate below counts the whole run):"
        )
        print(each.stats.summary())
    print(f"operations executed: {total_ops()}")
    print(f"operations with two mounts: {envs[True].stats.ops}")
    print(f"operations through the second mount: {envs[True].stats.second_ops}")
    print(f"checked calls through the second mount: {envs[True].stats.second_calls}")
    print(f"examples: {sum(v.stats.examples for v in envs.values())}")
    print(f"mismatches: {0 if mismatch is None else 1}")
    took = time.monotonic() - started
    print(f"rate: {total_ops() / took:.1f} ops/s over {took / 60:.1f} min")
    if code == 3:
        print(f"target of {args.operations} operations NOT reached within {args.max_minutes} min")
    if not args.keep and code in (0, 3):
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work directory kept: {workdir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
