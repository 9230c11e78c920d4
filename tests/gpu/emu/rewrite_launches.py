#!/usr/bin/env python3
"""Rewrites a .cu file for the CPU emulation (tests/gpu/emu): kernel launches
`k<<<grid, block, smem, stream>>>(args)` become `::emu::make_launch(k, grid, block, smem, stream)(args)`
and `extern __shared__ ... name[];` becomes a pointer to the launch's dynamic shared memory.
Usage: rewrite_launches.py IN.cu OUT.cpp"""
import re
import sys

src = open(sys.argv[1]).read()
out = re.sub(r"([A-Za-z_][\w:]*(?:<[\w:, ]+>)?)<<<(.*?)>>>\(", r"::emu::make_launch(\1, \2)(", src, flags=re.S)
out = re.sub(r"extern\s+__shared__[^;]*?\b(\w+)\[\];", r"unsigned char *\1 = ::emu::dynamic_smem();", out)
if "<<<" in out:
    sys.exit("rewrite_launches.py: a launch was not rewritten in " + sys.argv[1])
with open(sys.argv[2], "w") as f:
    f.write('#line 1 "%s"\n' % sys.argv[1])
    f.write(out)
