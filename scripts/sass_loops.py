#!/usr/bin/env python3
"""Instruction mix of the loops of CUDA kernels, from `cuobjdump -sass` output.

A static signal for sessions without a GPU: for each loop that issues tensor-core
instructions (HMMA; HGMMA, Hopper's warpgroup MMA), the instructions in its body by opcode. Counts are static:
the body includes every branch's code (e.g. an odd head-size path), so they
compare versions of a kernel, they do not time one.

    cuobjdump -sass -fun NAME k.cubin | python3 scripts/sass_loops.py NAME
Written for this project.
"""
import collections
import re
import sys

SHOWN = ["HMMA", "HGMMA", "LDSM", "MUFU", "LDGSTS", "BAR", "FMUL", "FFMA", "FMNMX", "ISETP", "SHFL", "F2FP", "LDL", "STL"]


def parse(lines):
    out = []
    for line in lines:
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def loops(ins):
    """(start, end) of each backward branch: a loop's body."""
    found = []
    for addr, text in ins:
        if "BRA" in text.split(" ", 2)[-1] or text.startswith("BRA") or " BRA " in f" {text} ":
            targets = re.findall(r"0x([0-9a-f]+)", text)
            if targets and int(targets[-1], 16) < addr:
                found.append((int(targets[-1], 16), addr))
    return found


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "kernel"
    ins = parse(sys.stdin)
    print(f"{name}: {len(ins)} instructions")
    for start, end in loops(ins):
        body = [t for a, t in ins if start <= a <= end]
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
        if ops["HMMA"]:
            mix = ", ".join(f"{op} {ops[op]}" for op in SHOWN)
            print(f"  loop {start:#x}-{end:#x}: {len(body)} instructions, {len(body) / ops['HMMA']:.1f} per HMMA; {mix}")
        elif ops["HGMMA"]:
            # One HGMMA here is 64 x N x 16 for the warpgroup: per warp, N / 8 of mma.sync's m16n8k16.
            mix = ", ".join(f"{op} {ops[op]}" for op in SHOWN)
            print(f"  loop {start:#x}-{end:#x}: {len(body)} instructions, HGMMA {ops['HGMMA']}; {mix}")


if __name__ == "__main__":
    main()
