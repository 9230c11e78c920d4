#!/usr/bin/env python3
"""What `defkv compress --output PATH` does to what is already at PATH, and to its temporary
file when it fails or is killed (docs/reliability.md, "CLI output paths and lookups").

  same file     --output names the input under another spelling or link: exit 2, input unchanged
  devices       a character device or FIFO is written into and stays what it is (exit 0; 1 for
                a device that fails writes); the system's /dev/null and /dev/stdout are tried
                only after private device nodes, FIFOs and links passed (see below)
  directories   a directory, a link to one, a link to nothing: exit 1, left as they are
  links         a link to a regular file: the file is replaced, the link stays a link
  signals       SIGTERM or SIGINT while the temporary file is being written, SIGXFSZ (file
                size limit): the process ends by that signal and no temporary file remains;
                with SIGXFSZ ignored the write fails with exit 1 and no temporary file remains

Every case also checks that no PATH.tmp.* file is left. Running as root, a defkv that replaced
special files would replace the system's /dev/null: that case runs only when a private null
device node (mknod, root only) survived, and --no-system-paths skips it and /dev/stdout (for
running this against an old, unfixed defkv).

usage: cli_output_paths.py DEFKV_PROGRAM WORK_DIR [--only SUBSTRING | --skip SUBSTRING] [--no-system-paths]"""
import os
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_bad_files import f32, header_file, valid_case  # noqa: E402


class Ctx:
    def __init__(self, prog, work):
        self.prog, self.work = prog, work
        self.passed = {}  # case name -> bool, for the guarded system-path cases
        hdr, data = valid_case()
        self.input = self.path("in.safetensors")
        with open(self.input, "wb") as f:
            f.write(header_file(hdr, data))
        with open(self.input, "rb") as f:
            self.input_bytes = f.read()
        ref = self.path("reference.out.safetensors")
        r = self.compress(ref)
        if r.returncode != 0:
            raise SystemExit("control run failed (exit %d): %s" % (r.returncode, r.stderr.decode(errors="replace")))
        with open(ref, "rb") as f:
            self.reference = f.read()

    def path(self, name):
        return os.path.join(self.work, name)

    def compress(self, output, inp=None, extra=(), **kw):
        cmd = [self.prog, "compress", "--input", inp or self.input, "--output", output, "--method", "defensivekv"]
        return subprocess.run(cmd + list(extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120, **kw)


def temp_files(directory, stem=""):
    return [n for n in os.listdir(directory) if ".tmp." in n and n.startswith(stem)]


def check_error(r, code, fails, must_say=None):
    err = r.stderr.decode(errors="replace")
    if r.returncode != code:
        fails.append("exit %d, expected %d (stderr %r)" % (r.returncode, code, err[:300]))
    lines = err.splitlines()
    if len(lines) != 1 or "error:" not in err:
        fails.append("stderr should be one 'error:' line, got %r" % err[:300])
    if must_say and must_say not in err.lower():
        fails.append("message does not say %r: %r" % (must_say, err[:300]))


def check_ok(r, fails):
    if r.returncode != 0:
        fails.append("exit %d: %r" % (r.returncode, r.stderr.decode(errors="replace")[:300]))


def fresh_dir(ctx, name):
    d = ctx.path(name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


# ---- the input under another name ------------------------------------------------------------
def same_file_case(how):
    def run(ctx, fails):
        d = fresh_dir(ctx, "same-" + how.replace(" ", "-"))
        src = os.path.join(d, "in.safetensors")
        with open(src, "wb") as f:
            f.write(ctx.input_bytes)
        inp, out = "in.safetensors", None
        if how == "dot slash":
            out = "./in.safetensors"
        elif how == "dot dot":
            os.makedirs(os.path.join(d, "sub"))
            out = "sub/../in.safetensors"
        elif how == "symlink to the input":
            os.symlink("in.safetensors", os.path.join(d, "link.safetensors"))
            out = "link.safetensors"
        elif how == "input is a symlink":
            os.symlink("in.safetensors", os.path.join(d, "link.safetensors"))
            inp, out = "link.safetensors", "in.safetensors"
        elif how == "hard link":
            os.link(src, os.path.join(d, "hard.safetensors"))
            out = "hard.safetensors"
        r = ctx.compress(out, inp=inp, cwd=d)
        check_error(r, 2, fails, must_say="same file")
        with open(src, "rb") as f:
            if f.read() != ctx.input_bytes:
                fails.append("the input was changed")
        if how in ("symlink to the input", "input is a symlink") and not os.path.islink(os.path.join(d, "link.safetensors")):
            fails.append("the link was replaced")
        if temp_files(d):
            fails.append("temporary files left: %s" % temp_files(d))
    return run


# ---- character devices and FIFOs ----------------------------------------------------------------
def device_case(name, major, minor, expect_ok):
    def run(ctx, fails):
        d = fresh_dir(ctx, "dev-" + name)
        node = os.path.join(d, name)
        try:
            os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        except PermissionError:
            print("  skipped: cannot create a device node here (not root)")
            return "skip"
        r = ctx.compress(node)
        if expect_ok:
            check_ok(r, fails)
        else:
            check_error(r, 1, fails, must_say="write failed")
        st = os.lstat(node)
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(major, minor):
            fails.append("%s is no longer the character device %d,%d (mode %o)" % (node, major, minor, st.st_mode))
        if temp_files(d):
            fails.append("temporary files left: %s" % temp_files(d))
    return run


def fifo_case(ctx, fails):
    d = fresh_dir(ctx, "fifo")
    fifo = os.path.join(d, "out.fifo")
    os.mkfifo(fifo)
    # A reader that never blocks: defkv's open for writing succeeds once it exists.
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    cmd = [ctx.prog, "compress", "--input", ctx.input, "--output", fifo, "--method", "defensivekv"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got = bytearray()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        chunk = os.read(fd, 1 << 16) if ready else b""
        got += chunk
        if not chunk:
            if p.poll() is not None:
                break
            time.sleep(0.005)
    os.close(fd)
    out, err = p.communicate(timeout=60)
    r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    check_ok(r, fails)
    if not stat.S_ISFIFO(os.lstat(fifo).st_mode):
        fails.append("the FIFO was replaced")
    elif bytes(got) != ctx.reference:
        fails.append("the FIFO's reader got %d bytes, not the %d of the result" % (len(got), len(ctx.reference)))
    if temp_files(d):
        fails.append("temporary files left: %s" % temp_files(d))


def system_devnull_case(ctx, fails):
    # Guard: a defkv that replaces special files would replace the system's /dev/null as root.
    if os.geteuid() == 0 and not ctx.passed.get("char device: private null node"):
        fails.append("not run: the private null device node did not survive (would risk /dev/null)")
        return
    r = ctx.compress("/dev/null")
    check_ok(r, fails)
    st = os.lstat("/dev/null")
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(1, 3):
        fails.append("/dev/null is no longer the null character device (mode %o)" % st.st_mode)


def dev_stdout_case(ctx, fails):
    # /dev/stdout is a link to /proc/self/fd/1, here a pipe: the result goes down the pipe and the
    # summary to stderr. Guarded like /dev/null (as root, a rename over /dev/stdout would succeed).
    if not (ctx.passed.get("FIFO") and ctx.passed.get("link to a regular file")):
        fails.append("not run: FIFO or link cases did not pass (would risk /dev/stdout)")
        return
    r = ctx.compress("/dev/stdout")
    check_ok(r, fails)
    if r.stdout != ctx.reference:
        fails.append("stdout has %d bytes, not the %d of the result" % (len(r.stdout), len(ctx.reference)))
    if not os.path.islink("/dev/stdout"):
        fails.append("/dev/stdout is no longer a link")


# ---- directories and links --------------------------------------------------------------------
def directory_case(kind):
    def run(ctx, fails):
        d = fresh_dir(ctx, "dir-" + kind.replace(" ", "-"))
        target = os.path.join(d, "target")
        out = os.path.join(d, "out.safetensors")
        if kind == "directory":
            os.makedirs(out)
            check = lambda: os.path.isdir(out) and not os.path.islink(out) and not os.listdir(out)
            say = "directory"
        elif kind == "link to a directory":
            os.makedirs(target)
            os.symlink(target, out)
            check = lambda: os.path.islink(out) and os.path.isdir(target) and not os.listdir(target)
            say = "directory"
        else:  # a link to nothing
            os.symlink(target, out)
            check = lambda: os.path.islink(out) and not os.path.lexists(target)
            say = "missing"
        r = ctx.compress(out)
        check_error(r, 1, fails, must_say=say)
        if not check():
            fails.append("%s was changed" % out)
        if temp_files(d):
            fails.append("temporary files left: %s" % temp_files(d))
    return run


def link_to_regular_case(ctx, fails):
    d = fresh_dir(ctx, "link-regular")
    target = os.path.join(d, "real.safetensors")
    with open(target, "wb") as f:
        f.write(b"old contents")
    out = os.path.join(d, "out.safetensors")
    os.symlink("real.safetensors", out)
    check_ok(ctx.compress(out), fails)
    if not os.path.islink(out):
        fails.append("the link was replaced by a file")
    with open(target, "rb") as f:
        if f.read() != ctx.reference:
            fails.append("the link's target does not hold the result")
    if temp_files(d):
        fails.append("temporary files left: %s" % temp_files(d))


# ---- signals and write failures ----------------------------------------------------------------
def big_input(ctx, L, d=64):
    """One layer, Hk=1, head dim d: keys and values of L*d floats each (--compact doubles the output)."""
    path = ctx.path("big-%d.safetensors" % L)
    if os.path.exists(path):
        return path
    W = 8
    block = f32([((i * 7919) % 101) / 101.0 - 0.5 for i in range(1024)])
    kv = (block * ((L * d * 4) // len(block) + 1))[:L * d * 4]
    q = f32([0.1] * (W * d))
    o = f32([0.01] * (d * d))
    tensors, off, parts = {}, 0, []
    for name, shape, raw in (("layers.0.queries", [1, W, d], q), ("layers.0.keys", [1, L, d], kv),
                             ("layers.0.values", [1, L, d], kv), ("layers.0.o_proj", [d, d], o)):
        tensors[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(raw)]}
        parts.append(raw)
        off += len(raw)
    tensors["__metadata__"] = {"window": str(W), "kernel": "5", "compression_ratio": "0"}
    with open(path, "wb") as f:
        f.write(header_file(tensors, b"".join(parts)))
    return path


def limits(fsize=None, ignore_xfsz=False):
    def pre():
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if ignore_xfsz:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return pre


def signal_while_writing_case(signum):
    def run(ctx, fails):
        d = fresh_dir(ctx, "sig-%d" % signum)
        out = os.path.join(d, "out.safetensors")
        stem = "out.safetensors.tmp."
        for attempt, L in enumerate((100000, 100000, 200000, 200000, 400000, 400000)):
            src = big_input(ctx, L)
            cmd = [ctx.prog, "compress", "--input", src, "--output", out, "--method", "snapkv", "--compact",
                   "--threads", "1"]
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=limits())
            caught = False
            while p.poll() is None:
                if temp_files(d, stem):
                    p.send_signal(signal.SIGSTOP)  # freeze it inside the write window, then verify
                    caught = bool(temp_files(d, stem)) and not os.path.exists(out)
                    if caught:
                        p.send_signal(signum)
                    p.send_signal(signal.SIGCONT)
                    break
            _, err = p.communicate(timeout=300)
            if not caught:  # finished (or renamed) before the signal: try a larger output
                print("  attempt %d (L=%d): missed the write window, exit %d" % (attempt, L, p.returncode))
                if p.returncode != 0:
                    fails.append("run without a signal failed: exit %d %r" % (p.returncode, err[-300:]))
                    return
                for n in temp_files(d):
                    os.remove(os.path.join(d, n))
                if os.path.exists(out):
                    os.remove(out)
                continue
            print("  attempt %d (L=%d): signal %d sent while %s* existed" % (attempt, L, signum, stem))
            if p.returncode != -signum:
                fails.append("exit status %d, expected death by signal %d (%d)" % (p.returncode, signum, -signum))
            if temp_files(d):
                fails.append("temporary files left: %s" % temp_files(d))
            if os.path.exists(out):
                fails.append("an output file exists")
            return
        fails.append("never caught the write window in 6 attempts")
    return run


def file_size_limit_case(ignore_xfsz):
    def run(ctx, fails):
        d = fresh_dir(ctx, "fsize-%s" % ("ignored" if ignore_xfsz else "signal"))
        out = os.path.join(d, "out.safetensors")
        src = big_input(ctx, 4096, d=8)  # --compact: about 300 KB of output, over the 64 KB limit
        cmd = [ctx.prog, "compress", "--input", src, "--output", out, "--method", "snapkv", "--compact"]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120,
                           preexec_fn=limits(fsize=64 << 10, ignore_xfsz=ignore_xfsz))
        if ignore_xfsz:
            check_error(r, 1, fails, must_say="write failed")
        elif r.returncode != -signal.SIGXFSZ:
            fails.append("exit status %d, expected death by SIGXFSZ (%d)" % (r.returncode, -signal.SIGXFSZ))
        if temp_files(d):
            fails.append("temporary files left: %s" % temp_files(d))
        if os.path.exists(out):
            fails.append("an output file exists")
    return run


CASES = [
    ("same file: dot slash", same_file_case("dot slash")),
    ("same file: dot dot", same_file_case("dot dot")),
    ("same file: symlink to the input", same_file_case("symlink to the input")),
    ("same file: input is a symlink", same_file_case("input is a symlink")),
    ("same file: hard link", same_file_case("hard link")),
    ("char device: private null node", device_case("null", 1, 3, True)),
    ("char device: private full node (writes fail)", device_case("full", 1, 7, False)),
    ("FIFO", fifo_case),
    ("directory", directory_case("directory")),
    ("link to a directory", directory_case("link to a directory")),
    ("link to nothing", directory_case("link to nothing")),
    ("link to a regular file", link_to_regular_case),
    ("system path: /dev/null", system_devnull_case),
    ("system path: /dev/stdout", dev_stdout_case),
    ("signal: SIGTERM while writing", signal_while_writing_case(signal.SIGTERM)),
    ("signal: SIGINT while writing", signal_while_writing_case(signal.SIGINT)),
    ("signal: SIGXFSZ (file size limit)", file_size_limit_case(False)),
    ("file size limit, SIGXFSZ ignored", file_size_limit_case(True)),
]


def main():
    args = sys.argv[1:]
    no_system = "--no-system-paths" in args
    args = [a for a in args if a != "--no-system-paths"]
    if len(args) not in (2, 4):
        print(__doc__)
        return 2
    prog, work = os.path.abspath(args[0]), os.path.abspath(args[1])
    only = args[3] if len(args) == 4 and args[2] == "--only" else None
    skip = args[3] if len(args) == 4 and args[2] == "--skip" else None
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    ctx = Ctx(prog, work)
    failures, ran = [], 0
    for name, fn in CASES:
        if (only and only not in name) or (skip and skip in name):
            continue
        if no_system and name.startswith("system path"):
            print("%s: skipped (--no-system-paths)" % name)
            continue
        print("%s:" % name)
        fails = []
        t0 = time.monotonic()
        result = fn(ctx, fails)
        if result == "skip":
            continue
        ran += 1
        ctx.passed[name] = not fails
        print("  %s (%.2f s)" % ("ok" if not fails else "FAILED", time.monotonic() - t0))
        failures += ["%s: %s" % (name, f) for f in fails]
    for n in os.listdir(work):  # the large inputs of the signal cases
        if n.startswith("big-"):
            os.remove(os.path.join(work, n))
    for f in failures:
        print("FAIL:", f)
    print("cli output paths: %d cases run, %d failures" % (ran, len(failures)))
    if ran == 0:
        print("no case ran")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
