#!/usr/bin/env python3
"""Link-time stand-ins for the CUDA libraries candle links (issue 9, tools/cuda/build.sh).

candle 0.11 builds cudarc with `dynamic-linking`: the binary names libcuda, libnvrtc, libcurand,
libcublas and libcublasLt as link-time dependencies. A CPU build machine has none of them and no
wheel ships the driver (libcuda), so the linker gets stubs: shared libraries that define every
function cudarc declares for that library, under the soname of CUDA 13.0's real one. Nothing ever
calls a stub; on the GPU machine the dynamic loader finds the real libraries by soname.

usage: stubs.py CUDARC_SRC_DIR OUT_DIR
"""
import pathlib
import re
import subprocess
import sys

# cudarc module -> (library name given to the linker, soname of CUDA 13.0's library)
LIBRARIES = {
    "driver": ("cuda", "libcuda.so.1"),
    "nvrtc": ("nvrtc", "libnvrtc.so.13"),
    "curand": ("curand", "libcurand.so.10"),
    "cublas": ("cublas", "libcublas.so.13"),
    "cublaslt": ("cublasLt", "libcublasLt.so.13"),
}

# Functions are declared one per line inside `extern "C" { ... }` blocks of each sys/mod.rs.
DECLARATION = re.compile(r"^\s+(?:pub )?fn ([A-Za-z_][A-Za-z0-9_]*)\(", re.M)


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for module, (name, soname) in LIBRARIES.items():
        rust = src / "src" / module / "sys" / "mod.rs"
        if not rust.exists():
            print(f"{rust}: missing (is {src} a cudarc source folder?)", file=sys.stderr)
            return 1
        names = sorted(set(DECLARATION.findall(rust.read_text())))
        if not names:
            print(f"{rust}: no function declarations found", file=sys.stderr)
            return 1
        c = out / f"{name}.c"
        c.write_text("".join(f"void {n}(void) {{}}\n" for n in names))
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-o", str(out / soname), f"-Wl,-soname,{soname}", str(c)],
            check=True,
        )
        link = out / f"lib{name}.so"
        link.unlink(missing_ok=True)
        link.symlink_to(soname)
        print(f"{soname}: {len(names)} functions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
