"""Writes one benchmark's section of docs/benchmarks.md; shared by scripts/bench-*.sh.

A section runs from `<!-- NAME:start -->` to `<!-- NAME:end -->`; writing one
replaces it (or appends it) and leaves the rest of the file as it is.
"""
import os
import platform
import re
import subprocess


def _sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def machine(libvirt=False):
    """The machine the figures come from; with libvirt, its and qemu's versions and KVM or TCG."""
    cpu = _sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2")
    mem = int(_sh("awk '/MemTotal/ {print $2}' /proc/meminfo") or 0) // 1024 // 1024
    osname = _sh(". /etc/os-release; echo $PRETTY_NAME")
    text = f"{os.cpu_count()} cores ({cpu}), {mem} GiB, {platform.release()}, {osname}"
    if libvirt:
        lv = _sh("libvirtd --version | awk '{print $3}'")
        qemu = _sh("qemu-system-x86_64 --version | head -1 | awk '{print $4}'")
        accel = "KVM" if os.access("/dev/kvm", os.W_OK) else "TCG"
        text += f", libvirt {lv}, qemu {qemu}, guests {accel}"
    return text


def write_section(out, name, section, keep_from=None):
    """Puts `section` (markers included) in place of NAME's section of `out`.

    With `keep_from`, the old section's hand-kept tail, from that heading to
    the end marker, is carried over into the new one.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    try:
        text = open(out).read()
    except FileNotFoundError:
        text = "# Benchmarks\n\nFigures printed by the benchmark scripts; each section says how it was measured.\n"
    old = re.search(re.escape(start) + r"(.*?)" + re.escape(end) + r"\n?", text, flags=re.S)
    section = section.rstrip("\n") + "\n"
    if keep_from and old and keep_from in old.group(1):
        kept = old.group(1)[old.group(1).index(keep_from):].rstrip("\n")
        section = section.replace(end, "\n" + kept + "\n" + end, 1)
    if old:
        text = text[: old.start()] + section + text[old.end():]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(out, "w") as f:
        f.write(text)
