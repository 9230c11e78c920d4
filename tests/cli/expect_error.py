#!/usr/bin/env python3
"""Asserts that a command fails cleanly.

usage: expect_error.py [--exit N] [--absent PATH] [--match TEXT] -- COMMAND...
Passes when the command exits with a non-zero status (N if given) that is not a signal or crash,
writes exactly one line to stderr containing "error:", and (with --absent) PATH does not exist
afterwards, nor any temporary file PATH.tmp.*, and (with --match) stderr contains TEXT. PATH is
removed before the run."""
import glob
import os
import subprocess
import sys


def main():
    args = sys.argv[1:]
    want_exit, absent, match = None, [], []
    while args and args[0] != "--":
        if args[0] == "--exit":
            want_exit = int(args[1])
            args = args[2:]
        elif args[0] == "--match":
            match.append(args[1])
            args = args[2:]
        elif args[0] == "--absent":
            absent.append(args[1])
            args = args[2:]
        else:
            print("expect_error.py: unknown option %s" % args[0])
            return 2
    cmd = args[1:]
    if not cmd:
        print("expect_error.py: no command")
        return 2
    for p in absent:
        if os.path.exists(p):
            os.remove(p)
    run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    err = run.stderr.decode("utf-8", "replace")
    print("command: %s\nexit: %d\nstderr: %r" % (" ".join(cmd), run.returncode, err))
    ok = True
    if run.returncode == 0:
        print("FAIL: exit status 0, expected a failure")
        ok = False
    elif run.returncode < 0 or run.returncode >= 126:
        print("FAIL: exit status %d looks like a crash or signal" % run.returncode)
        ok = False
    elif want_exit is not None and run.returncode != want_exit:
        print("FAIL: exit status %d, expected %d" % (run.returncode, want_exit))
        ok = False
    lines = err.splitlines()
    if len(lines) != 1:
        print("FAIL: stderr has %d lines, expected exactly 1" % len(lines))
        ok = False
    if "error:" not in err:
        print("FAIL: stderr does not contain 'error:'")
        ok = False
    for text in match:
        if text not in err:
            print("FAIL: stderr does not contain %r" % text)
            ok = False
    for p in absent:
        if os.path.exists(p):
            print("FAIL: %s was created" % p)
            ok = False
        left = glob.glob(glob.escape(p) + ".tmp.*")
        if left:
            print("FAIL: temporary files left: %s" % left)
            ok = False
    print("PASS" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
